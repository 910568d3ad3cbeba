"""The audit trail: PS3.15 A.5 events, an encrypted hash-chained store, verification and forwarding."""
