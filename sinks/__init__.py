"""Materializers of the log: Milvus (plaintext memories), MinIO (tensors, vault), ClickHouse
(audit, versions). Nothing but a sink writes to a view."""
