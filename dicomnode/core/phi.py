"""Which header attributes may travel with a volume to a model that runs elsewhere.

A model manifest may list DICOM attributes its model needs besides the voxels and the
geometry (``attributes: [KVP, ConvolutionKernel]``). A worker on another machine gets
their values from the first slice's header; none of them may identify the patient. The
rules follow the Basic Application Level Confidentiality Profile (PS3.15 Annex E, Table
E.1-1) with its Retain Patient Characteristics Option (E.3.6):

* no person names, dates, times or UIDs (VR PN, DA, DT, TM, UI), no sequences or bulk
  data (SQ, OB, OW, OF, OD, OL, OV, UN);
* none of the identifying attributes of Table E.1-1 (IDs, accession and study numbers,
  institution, station, device serials, free-text descriptions and comments...);
* patient characteristics (age, sex, size, weight) are allowed, as that option allows.
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, tag_for_keyword

#: VRs that never travel: names, dates, times, UIDs, sequences and bulk data.
REFUSED_VRS = frozenset({"PN", "DA", "DT", "TM", "UI", "SQ", "OB", "OW", "OF", "OD", "OL",
                         "OV", "UN", "UR"})

#: PS3.15 Table E.1-1 attributes (those that are not already refused by their VR).
IDENTIFYING_KEYWORDS = frozenset({
    "AccessionNumber", "AcquisitionComments", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "ActualHumanPerformersSequence", "AdditionalPatientHistory",
    "AdmissionID", "AdmittingDiagnosesDescription", "Allergies", "Arbitrary", "AuthorObserverSequence",
    "BranchOfService", "CassetteID", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "CommentsOnThePerformedProcedureStep",
    "ConsultingPhysicianIdentificationSequence", "ContentSequence", "ContributionDescription",
    "CountryOfResidence", "CurrentPatientLocation", "CustodialOrganizationSequence",
    "DataSetTrailingPadding", "DerivationDescription", "DetectorID", "DeviceDescription",
    "DeviceSerialNumber", "DeviceUID", "DigitalSignaturesSequence", "DischargeDiagnosisDescription",
    "DistributionAddress", "DistributionName", "EthnicGroup", "FillerOrderNumberImagingServiceRequest",
    "FrameComments", "GantryID", "GeneratorID", "HumanPerformerOrganization", "IconImageSequence",
    "IdentifyingComments", "ImageComments", "ImagePresentationComments",
    "ImagingServiceRequestComments", "Impressions", "InstitutionAddress", "InstitutionCodeSequence",
    "InstitutionName", "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber",
    "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "MAC",
    "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence",
    "ModifiedImageDescription", "ModifyingDeviceID", "ModifyingDeviceManufacturer",
    "NamesOfIntendedRecipientsOfResults", "Occupation", "OperatorIdentificationSequence",
    "OrderCallbackPhoneNumber", "OrderEnteredBy", "OrderEntererLocation",
    "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientComments", "PatientID",
    "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
    "PatientPrimaryLanguageModifierCodeSequence", "PatientReligiousPreference",
    "PatientState", "PatientTelephoneNumbers", "PatientTransportArrangements",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence", "PhysicianApprovingInterpretation",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication",
    "PregnancyStatus", "ProtocolName", "ReasonForTheImagingServiceRequest", "ReasonForStudy",
    "ReferencedPatientAliasSequence", "ReferencedPatientSequence", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureLocation", "RequestingService", "ResultsIDIssuer", "ResultsComments",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "ScheduledProcedureStepLocation", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
    "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "ScheduledStudyLocationAETitle",
    "SeriesDescription", "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus",
    "SourceImageSequence", "SpecialNeeds", "StationName", "StudyComments", "StudyDescription",
    "StudyID", "StudyIDIssuer", "TextComments", "TextString", "TopicAuthor", "TopicKeywords",
    "TopicSubject", "TopicTitle", "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverSequence", "VerifyingOrganization", "VisitComments",
})

#: Retain Patient Characteristics Option (PS3.15 E.3.6).
PATIENT_CHARACTERISTICS = frozenset({"PatientAge", "PatientSex", "PatientSize", "PatientWeight"})


def check_shareable(keyword: str) -> str:
    """Return ``keyword`` if its value may go to a remote worker; raise ValueError saying why not."""
    if not isinstance(keyword, str) or tag_for_keyword(keyword) is None:
        raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
    if keyword in PATIENT_CHARACTERISTICS:
        return keyword
    vr = dictionary_VR(keyword)
    if any(v.strip() in REFUSED_VRS for v in vr.split(" or ")):
        raise ValueError(f"{keyword} (VR {vr}) may identify the patient or is not a plain"
                         " value; it never leaves the node")
    if keyword in IDENTIFYING_KEYWORDS or keyword.startswith("Patient"):
        raise ValueError(f"{keyword} may identify the patient (PS3.15 Table E.1-1); it never"
                         " leaves the node")
    return keyword
