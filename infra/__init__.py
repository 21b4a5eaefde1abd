"""Start, stop and inspect the local services (Kafka KRaft broker, MinIO); see ``services``."""
