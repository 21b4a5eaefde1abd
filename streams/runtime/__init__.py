"""The runtime: the processor model, the host that supervises processors, partition ownership
and fold snapshots. Knows Kafka and the fold, not what any processor does."""
