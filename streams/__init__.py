"""Topics, settings, the Kafka producer/consumer SDK, the CLI (and, later, the HTTP API, replay)."""
