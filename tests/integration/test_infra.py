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

    rows = {row.name: row for row in services.status(s)}
    assert (rows["kafka"].state, rows["kafka"].pid) == ("running", kafka_pid)
    assert (rows["minio"].state, rows["minio"].pid) == ("running", minio_pid)
    assert rows["milvus"].state == rows["clickhouse"].state == "embedded"
    assert all(row.running for row in rows.values())
    status = memstream(private_env, "infra", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(kafka_pid) in status.stdout and str(minio_pid) in status.stdout

    down = memstream(private_env, "infra", "down")
    assert down.returncode == 0
    assert "minio" in down.stdout and "kafka" in down.stdout
    assert not pid_alive(kafka_pid) and not pid_alive(minio_pid)
    assert not any(port_open(p) for p in PORTS.values())
    states = {row.name: row.state for row in services.status(s)}
    assert (states["kafka"], states["minio"]) == ("stopped", "stopped")
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


def test_status_of_the_running_services_is_checked(base_settings: Settings) -> None:
    """The services `memstream infra up` started: each pid alive and its port answering."""
    rows = {row.name: row for row in services.status(base_settings)}
    for name in ("kafka", "minio"):
        assert rows[name].state == "running", rows[name].detail
        assert rows[name].pid is not None and pid_alive(rows[name].pid)
    assert rows["milvus"].state == "embedded", rows["milvus"].detail
    assert rows["milvus"].detail == base_settings.effective_milvus_uri
    assert rows["clickhouse"].state == "embedded", rows["clickhouse"].detail
    assert rows["clickhouse"].detail.startswith("chdb://")
    assert all(row.running for row in rows.values())


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nobody listens on: bound here (so nobody else can take it), never listening."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield reserved.getsockname()[1]


def test_store_servers_on_a_closed_port_are_unreachable(tmp_path: Path, closed_port: int) -> None:
    s = Settings(
        data_dir=tmp_path,
        milvus_uri=f"http://127.0.0.1:{closed_port}",
        clickhouse_url=f"http://memstream:hunter2@127.0.0.1:{closed_port}/memstream",
    )
    rows = {row.name: row for row in services.status(s)}
    for name in ("milvus", "clickhouse"):
        assert (rows[name].kind, rows[name].state) == ("server", "unreachable")
        assert not rows[name].running
        assert f"no connection to 127.0.0.1:{closed_port}" in rows[name].detail
    assert "hunter2" not in rows["clickhouse"].detail


def test_local_services_on_closed_ports_are_stopped(tmp_path: Path, closed_port: int) -> None:
    s = Settings(
        data_dir=tmp_path,
        kafka_bootstrap=f"127.0.0.1:{closed_port}",
        minio_endpoint=f"127.0.0.1:{closed_port}",
    )
    rows = {row.name: row for row in services.status(s)}
    for name in ("kafka", "minio"):
        assert (rows[name].state, rows[name].pid, rows[name].running) == ("stopped", None, False)


def test_a_port_taken_by_another_process_is_foreign_not_running(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        s = Settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{squatter.getsockname()[1]}")
        row = services.status(s)[0]
    assert (row.name, row.state, row.running) == ("kafka", "foreign", False)
    assert "memstream did not start what listens there" in row.detail


def test_embedded_stores_without_a_writable_folder_are_unavailable(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where the data folder should be")
    rows = {row.name: row for row in services.status(Settings(data_dir=not_a_folder))}
    for name in ("milvus", "clickhouse"):
        assert (rows[name].state, rows[name].running) == ("unavailable", False)
        assert f"{not_a_folder} is not a directory" in rows[name].detail
