"""``memstream infra up|down|status``: every local service, in dependency order."""

from __future__ import annotations

import importlib
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from infra import kafka, minio
from infra.process import InfraError, port_open, read_pid
from sinks.stores import ensure_bucket
from streams.settings import Settings
from streams.transport.topics import ensure_topics, wait_for_group_coordinator

SERVER_TIMEOUT = 2.0  # seconds a server gets to accept a connection, and to answer one request


@dataclass(frozen=True)
class ServiceStatus:
    """What ``infra status`` shows for one service: a ``state`` checked just now.

    States: ``running`` (a process memstream started that answers on its port, or a server
    that answers a request), ``embedded`` (nothing runs: the engine imports and its data folder
    is writable), ``stopped`` (local: no process, nothing on the port), ``unresponsive`` (the
    process memstream started lives but its port does not answer: starting, or hung),
    ``foreign`` (the port answers but memstream did not start what serves it), ``unreachable``
    (no connection within the timeout), ``failing`` (a server that accepts the connection but
    not the request), ``unavailable`` (an embedded engine that cannot work here). ``detail``
    says where the service is, and why when it is not usable.
    """

    name: str
    kind: str
    state: str
    detail: str
    pid: int | None = None

    @property
    def running(self) -> bool:
        """Usable as ``infra up`` leaves it: ``running`` or ``embedded``. A ``foreign`` service
        answers, but is not the one memstream manages (``infra up`` refuses its port)."""
        return self.state in {"running", "embedded"}


def up(settings: Settings) -> list[ServiceStatus]:
    """Start whatever is not running yet (idempotent); create the bucket and the topics."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.kafka_is_local:
        kafka.up(settings)
    elif not kafka.answers(settings):
        raise InfraError(f"Kafka at {settings.kafka_bootstrap} does not answer")
    ensure_topics(settings)
    wait_for_group_coordinator(settings)
    if _minio_is_local(settings):
        minio.up(settings)
    elif not minio.answers(settings):
        raise InfraError(f"MinIO at {settings.minio_endpoint} does not answer")
    ensure_bucket(settings)
    return status(settings)


def down(settings: Settings) -> list[str]:
    """Stop the local services memstream started; return the names of those stopped."""
    stopped = []
    if minio.down(settings):
        stopped.append("minio")
    if kafka.down(settings):
        stopped.append("kafka")
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """Every service's state, checked now (a pid, a port and a request each; nothing assumed)."""
    return [_kafka(settings), _minio(settings), _milvus(settings), _clickhouse(settings)]


def _kafka(settings: Settings) -> ServiceStatus:
    where = f"{settings.kafka_bootstrap}  data {kafka.home(settings) / 'data'}"
    if not settings.kafka_is_local:
        return _remote("kafka", where, kafka.answers(settings))
    pid = read_pid(kafka.pidfile(settings))
    answers, taken = kafka.answers(settings), port_open(settings.kafka_port)
    return _local("kafka", "local KRaft broker", where, pid, answers, taken)


def _minio(settings: Settings) -> ServiceStatus:
    where = f"{settings.minio_endpoint}  bucket {settings.minio_bucket}"
    if not _minio_is_local(settings):
        return _remote("minio", where, minio.answers(settings))
    pid = read_pid(minio.pidfile(settings))
    answers, taken = minio.answers(settings), port_open(settings.minio_port)
    return _local("minio", "local server", where, pid, answers, taken)


def _milvus(settings: Settings) -> ServiceStatus:
    uri = settings.effective_milvus_uri
    if settings.milvus_is_embedded:
        modules = ("pymilvus", "milvus_lite")
        return _embedded("milvus", "embedded milvus-lite", uri, modules, Path(uri).parent)

    def ask() -> None:
        from pymilvus import MilvusClient

        token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
        client = MilvusClient(uri=uri, token=token, timeout=SERVER_TIMEOUT)
        try:
            client.get_server_version(timeout=SERVER_TIMEOUT)
        finally:
            client.close()

    return _server("milvus", uri, uri, (19530, 443), ask, secrets=())


def _clickhouse(settings: Settings) -> ServiceStatus:
    dsn = settings.effective_clickhouse_dsn
    where = settings.masked()["effective_clickhouse_dsn"]
    if settings.clickhouse_is_embedded:
        modules = ("clickhouse_connect", "chdb")
        return _embedded("clickhouse", "embedded chdb", where, modules, Path(dsn[len("chdb://") :]))

    def ask() -> None:
        import clickhouse_connect

        client = clickhouse_connect.get_client(
            dsn=dsn, connect_timeout=SERVER_TIMEOUT, send_receive_timeout=SERVER_TIMEOUT
        )
        try:
            client.command("SELECT 1")
        finally:
            client.close()

    password = urlparse(dsn).password
    return _server("clickhouse", where, dsn, (8123, 8443), ask, secrets=(password or "",))


def _local(
    name: str, kind: str, where: str, pid: int | None, answers: bool, port_taken: bool
) -> ServiceStatus:
    """A service ``infra up`` runs here: ``running`` only when its process lives and answers."""
    if pid is not None and answers:
        return ServiceStatus(name, kind, "running", where, pid)
    if pid is not None:
        why = f"pid {pid} alive, the port does not answer: starting up, or hung (see its log)"
        return ServiceStatus(name, kind, "unresponsive", _because(where, why), pid)
    if answers or port_taken:
        served = "answers" if answers else f"is taken, and does not answer as {name}"
        why = f"the port {served}, but memstream did not start what listens there"
        return ServiceStatus(name, kind, "foreign", _because(where, why))
    return ServiceStatus(name, kind, "stopped", where)


def _remote(name: str, where: str, answers: bool) -> ServiceStatus:
    if answers:
        return ServiceStatus(name, "remote", "running", where)
    why = f"no answer within {SERVER_TIMEOUT:.0f}s"
    return ServiceStatus(name, "remote", "unreachable", _because(where, why))


def _embedded(
    name: str, kind: str, where: str, modules: tuple[str, ...], folder: Path
) -> ServiceStatus:
    """An engine inside each memstream process: usable when it imports and can write its data."""
    why = _cannot_import(modules) or _cannot_write(folder)
    return ServiceStatus(name, kind, "unavailable" if why else "embedded", _because(where, why))


def _cannot_import(modules: tuple[str, ...]) -> str | None:
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a native engine fails with OSError too, not only ImportError
            return f"{module} does not import: {_first_line(exc)}"
    return None


def _cannot_write(folder: Path) -> str | None:
    """Why the engine could not create files in ``folder`` (made on first use when missing)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} is not writable: {exc.strerror}"
    return None


def _server(
    name: str,
    where: str,
    url: str,
    default_ports: tuple[int, int],
    ask: Callable[[], None],
    secrets: tuple[str, ...],
) -> ServiceStatus:
    """A store server: ``unreachable`` when no connection opens within the timeout, ``failing``
    when the client's request fails (the reason shown, ``secrets`` masked), else ``running``.

    ``default_ports`` are (plain, TLS), for a URL that names no port.
    """
    parsed = urlparse(url)
    port = parsed.port or default_ports[parsed.scheme == "https"]
    try:
        socket.create_connection((parsed.hostname or "localhost", port), SERVER_TIMEOUT).close()
    except OSError as exc:
        why = f"no connection to {parsed.hostname}:{port}: {exc.strerror or exc}"
        return ServiceStatus(name, "server", "unreachable", _because(where, why))
    try:
        ask()
    except Exception as exc:  # whatever the client raises, the operator needs its message
        why = f"{type(exc).__name__}: {_first_line(exc)}"
        for secret in filter(None, secrets):
            why = why.replace(secret, "********")
        return ServiceStatus(name, "server", "failing", _because(where, why))
    return ServiceStatus(name, "server", "running", where)


def _because(where: str, why: str | None) -> str:
    return f"{where}  ({why})" if why else where


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _minio_is_local(settings: Settings) -> bool:
    host = settings.minio_endpoint.rsplit(":", 1)[0]
    return host in {"127.0.0.1", "localhost"}


__all__ = ["InfraError", "ServiceStatus", "down", "port_open", "status", "up"]
