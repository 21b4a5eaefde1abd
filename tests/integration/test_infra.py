"""`memstream infra up|down|status` on a second, private set of services (own ports, own data)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import kafka, minio, services
from infra.process import InfraError, pid_alive, port_open
from streams.settings import Settings

pytestmark = pytest.mark.integration

PORTS = {"kafka": 19092, "controller": 19093, "minio": 19000, "console": 19001}


@pytest.fixture
def private_env(tmp_path: Path, base_settings: Settings) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "MEMSTREAM_DATA_DIR": str(tmp_path / "data"),
        "MEMSTREAM_TOOLS_DIR": str(base_settings.tools_dir),
        "MEMSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{PORTS['kafka']}",
        "MEMSTREAM_KAFKA_CONTROLLER_PORT": str(PORTS["controller"]),
        "MEMSTREAM_MINIO_ENDPOINT": f"127.0.0.1:{PORTS['minio']}",
        "MEMSTREAM_MINIO_CONSOLE_PORT": str(PORTS["console"]),
    }
    yield env
    memstream(env, "infra", "down")


def memstream(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def private_settings(env: dict[str, str]) -> Settings:
    return Settings(
        data_dir=Path(env["MEMSTREAM_DATA_DIR"]),
        tools_dir=Path(env["MEMSTREAM_TOOLS_DIR"]),
        kafka_bootstrap=env["MEMSTREAM_KAFKA_BOOTSTRAP"],
        kafka_controller_port=PORTS["controller"],
        minio_endpoint=env["MEMSTREAM_MINIO_ENDPOINT"],
        minio_console_port=PORTS["console"],
    )


def test_up_twice_is_harmless_and_down_leaves_nothing(private_env: dict[str, str]) -> None:
    first = memstream(private_env, "infra", "up")
    assert first.returncode == 0, first.stdout + first.stderr
    s = private_settings(private_env)
    kafka_pid = int(kafka.pidfile(s).read_text())
    minio_pid = int(minio.pidfile(s).read_text())
    assert kafka.answers(s) and minio.answers(s)

    second = memstream(private_env, "infra", "up")
    assert second.returncode == 0, second.stdout + second.stderr
    assert int(kafka.pidfile(s).read_text()) == kafka_pid
    assert int(minio.pidfile(s).read_text()) == minio_pid

    status = memstream(private_env, "infra", "status")
    assert status.returncode == 0
    assert status.stdout.count("running") == 4
    assert str(kafka_pid) in status.stdout and str(minio_pid) in status.stdout

    down = memstream(private_env, "infra", "down")
    assert down.returncode == 0
    assert "minio" in down.stdout and "kafka" in down.stdout
    assert not pid_alive(kafka_pid) and not pid_alive(minio_pid)
    assert not any(port_open(p) for p in PORTS.values())
    leftovers = subprocess.run(
        ["pgrep", "-f", private_env["MEMSTREAM_DATA_DIR"]], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
    assert "nothing was running" in memstream(private_env, "infra", "down").stdout


def test_a_taken_port_is_a_clear_error(private_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", PORTS["kafka"]))
        squatter.listen()
        result = memstream(private_env, "infra", "up")
    assert result.returncode == 1
    message = " ".join(result.stdout.split())
    assert f"port {PORTS['kafka']} is taken by another process" in message
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_build_tools_are_a_clear_error(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data", tools_dir=tmp_path / "empty-tools")
    saved = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)
    try:
        with pytest.raises(InfraError, match=r"'mvn' not found on PATH: install Maven"):
            kafka.ensure_jars(s)
        with pytest.raises(InfraError, match=r"'go' not found on PATH"):
            minio.ensure_binary(s)
    finally:
        os.environ["PATH"] = saved


def test_status_reports_embedded_store_folders(base_settings: Settings) -> None:
    rows = {row.name: row for row in services.status(base_settings)}
    assert rows["milvus"].detail == base_settings.effective_milvus_uri
    assert rows["clickhouse"].detail.startswith("chdb://")
    assert rows["kafka"].running and rows["minio"].running
