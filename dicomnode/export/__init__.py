"""Export: sending instances and results to DICOM peers."""
