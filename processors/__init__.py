"""Stream transforms: MemReader, fusion, MemScheduler, lifecycle and governance checks."""
