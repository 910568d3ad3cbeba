"""dicomnode: a DICOM AI node for hospitals.

Receives studies (DIMSE C-STORE, later STOW-RS), stores every instance durably,
decides when a study is complete and hands it to the next stage.
"""

__version__ = "0.1.0"
