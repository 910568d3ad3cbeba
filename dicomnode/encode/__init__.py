"""Encode: predictions become DICOM objects (SEG, TID 1500 SR, GSPS, secondary
capture) in the source study. Never imports torch."""
