"""Inference: series to volume, model manifests and runtimes, device choice.

Never imports pynetdicom; torch is imported lazily by the runtimes that need it.
"""
