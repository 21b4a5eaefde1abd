"""The SDK: HTTP clients, the op subscriber, a local serve process, the LoCoMo loader."""
