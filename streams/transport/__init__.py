"""Transport: topics, the Avro producer and consumer, the dead-letter path. Talks to Kafka only."""
