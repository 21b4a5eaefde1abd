"""The query side: hybrid search over the per-cube working set, fed by the views processor."""
