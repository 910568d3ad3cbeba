"""Below every stage: the DICOM element walker, the UID rule, the status table, the
storage layout (paths, job keys, atomic writes), the index with its typed queries, the
model manifest, and the typed records that flow between stages.

Nothing here imports a stage (ingest, routing, inference, encode, export)."""
