"""Avro schemas of every memstream event (all versions kept) and the codec that reads them."""

from schemas.codec import (
    Codec,
    Decoded,
    DecodeError,
    SchemaError,
    SchemaRegistry,
    SchemaVersion,
    default_registry,
)

__all__ = [
    "Codec",
    "DecodeError",
    "Decoded",
    "SchemaError",
    "SchemaRegistry",
    "SchemaVersion",
    "default_registry",
]
