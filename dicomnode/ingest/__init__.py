"""Ingest: the front doors (DIMSE, later DICOMweb), the spool and study completion."""
