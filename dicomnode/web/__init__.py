"""The read side of DICOMweb (PS3.18): QIDO-RS and WADO-RS, bearer-token auth, and
serving ASGI applications; the STOW-RS door lives in :mod:`dicomnode.ingest.stow`."""
