"""A local MinIO server built once with ``go install`` from the Go module proxy."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from infra.process import InfraError, require_tool, run_tool, start_process, stop_process
from streams.settings import Settings

MODULE = "github.com/minio/minio"


def binary(settings: Settings) -> Path:
    return settings.tools_dir / f"minio-{settings.minio_version}" / "minio"


def home(settings: Settings) -> Path:
    return settings.data_dir / "minio"


def pidfile(settings: Settings) -> Path:
    return home(settings) / "minio.pid"


def logfile(settings: Settings) -> Path:
    return home(settings) / "minio.log"


def ensure_binary(settings: Settings) -> Path:
    """Build the pinned MinIO server into the tools dir unless it is already there."""
    path = binary(settings)
    if path.exists():
        return path
    go = require_tool("go", "install Go 1.24+ to build the MinIO server")
    path.parent.mkdir(parents=True, exist_ok=True)
    run_tool(
        [go, "install", f"{MODULE}@{settings.minio_version}"],
        f"building MinIO {settings.minio_version} with go install (takes a few minutes once)",
        env={"GOBIN": str(path.parent), "CGO_ENABLED": "0"},
    )
    if not path.exists():
        raise InfraError(f"go install finished but {path} is missing")
    return path


def answers(settings: Settings) -> bool:
    """True when MinIO's liveness endpoint answers 200."""
    scheme = "https" if settings.minio_secure else "http"
    url = f"{scheme}://{settings.minio_endpoint}/minio/health/live"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def up(settings: Settings) -> tuple[int, bool]:
    """Build if needed and start the server; wait until it answers. (pid, started)."""
    ensure_binary(settings)
    data = home(settings) / "data"
    data.mkdir(parents=True, exist_ok=True)
    return start_process(
        "minio",
        [
            str(binary(settings)),
            "server",
            str(data),
            "--address",
            settings.minio_endpoint,
            "--console-address",
            f"127.0.0.1:{settings.minio_console_port}",
            "--quiet",
        ],
        pidfile(settings),
        logfile(settings),
        [settings.minio_port, settings.minio_console_port],
        lambda: answers(settings),
        env={
            "MINIO_ROOT_USER": settings.minio_access_key,
            "MINIO_ROOT_PASSWORD": settings.minio_secret_key.get_secret_value(),
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        },
        timeout=60,
    )


def down(settings: Settings) -> bool:
    return stop_process(pidfile(settings))
