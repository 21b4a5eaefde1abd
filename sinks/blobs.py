"""Content-addressed blobs in MinIO: KV caches now, LoRA adapters next.

An object lives at ``blobs/<kind>/<sha256>.<ext>`` and is named by ``s3://<bucket>/<key>``. A
``put`` of bytes already stored is a no-op (same content, same key), so writers can retry and
replays never duplicate. Ops carry the URI and the sha256 (claim-check: the blob is written
before the op that names it), and ``get`` refuses bytes whose hash is not the one asked for.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import TYPE_CHECKING

from minio import Minio
from minio.error import S3Error

from streams.settings import Settings

if TYPE_CHECKING:
    from transformers import DynamicCache

    from processors.kv_cache import ModelIdentity

_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>blobs/[a-z0-9_-]+/[0-9a-f]{64}\.[a-z0-9]+)$")
_KIND = re.compile(r"^[a-z0-9_-]+$")


class BlobMissing(LookupError):
    """No object at the URI."""


class BlobCorrupted(ValueError):
    """The object's bytes do not have the sha256 the caller asked for."""


def blob_key(kind: str, sha256: str, ext: str = "safetensors") -> str:
    if not _KIND.match(kind):
        raise ValueError(f"blob kind {kind!r}: lowercase letters, digits, '-' and '_' only")
    return f"blobs/{kind}/{sha256}.{ext}"


def parse_uri(uri: str) -> tuple[str, str, str]:
    """(bucket, key, sha256 in the key) of a blob URI; ValueError for anything else."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"not a memstream blob URI: {uri!r}")
    key = match["key"]
    return match["bucket"], key, key.rsplit("/", 1)[1].split(".", 1)[0]


class BlobStore:
    """``put(kind, data) -> (uri, sha256)``, ``get(uri, sha256) -> bytes`` on one bucket."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        from sinks.stores import ensure_bucket, minio_client

        client = minio_client(settings)
        ensure_bucket(settings, client)
        return cls(client, settings.minio_bucket)

    def uri(self, kind: str, sha256: str, ext: str = "safetensors") -> str:
        return f"s3://{self.bucket}/{blob_key(kind, sha256, ext)}"

    def put(
        self, kind: str, data: bytes, ext: str = "safetensors", *, replace: bool = False
    ) -> tuple[str, str]:
        """Store ``data`` under its sha256 (once: an object already there is left alone, unless
        ``replace``: writing back the right bytes over an object found damaged)."""
        sha256 = hashlib.sha256(data).hexdigest()
        key = blob_key(kind, sha256, ext)
        if replace or not self._same_exists(key, len(data)):
            self.client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type="application/octet-stream",
                metadata={"sha256": sha256},
            )
        return f"s3://{self.bucket}/{key}", sha256

    def _same_exists(self, key: str, size: int) -> bool:
        try:
            return self.client.stat_object(self.bucket, key).size == size
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise

    def get_unverified(self, uri: str) -> bytes:
        """The object's bytes as stored, for a reader that checks them itself (the KV cache
        loader tells a truncated object from a changed one)."""
        bucket, key, _ = parse_uri(uri)
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                raise BlobMissing(f"no blob at {uri}") from exc
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get(self, uri: str, sha256: str) -> bytes:
        """The object's bytes, verified: their sha256 must be ``sha256`` (and the key's)."""
        _, _, named = parse_uri(uri)
        if named != sha256:
            raise BlobCorrupted(f"{uri} is named for sha256 {named[:16]}..., not {sha256[:16]}...")
        data = self.get_unverified(uri)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise BlobCorrupted(
                f"{uri}: {len(data):,} bytes with sha256 {actual[:16]}..., expected "
                f"{sha256[:16]}...: the object was changed or cut short after it was written"
            )
        return data

    def exists(self, uri: str) -> bool:
        bucket, key, _ = parse_uri(uri)
        try:
            self.client.stat_object(bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise

    def delete(self, uri: str) -> None:
        bucket, key, _ = parse_uri(uri)
        self.client.remove_object(bucket, key)

    # -- KV caches -------------------------------------------------------------------------------

    def put_kv_cache(
        self,
        lm: ModelIdentity,
        cache: DynamicCache,
        prefix_text: str,
        memory_ids: tuple[str, ...] | list[str] = (),
        adapter_sha256: str = "",
    ) -> tuple[str, str, int]:
        """Serialize and store a prefix cache; (uri, sha256, object bytes)."""
        from processors.kv_cache import KIND, dump_for

        data = dump_for(lm, cache, prefix_text, memory_ids, adapter_sha256)
        uri, sha256 = self.put(KIND, data)
        return uri, sha256, len(data)

    def get_kv_cache(
        self,
        lm: ModelIdentity,
        uri: str,
        sha256: str,
        *,
        prefix_text: str | None = None,
        adapter_sha256: str = "",
    ) -> DynamicCache:
        """Fetch, verify and rebuild a stored cache for ``lm``; raises
        :class:`processors.kv_cache.CacheRefused` (with its reason) or :class:`BlobMissing`."""
        from processors.kv_cache import load_for

        return load_for(lm, self.get_unverified(uri), sha256, prefix_text=prefix_text,
                        adapter_sha256=adapter_sha256)  # fmt: skip
