"""Background processes for local services: pid files, port checks, start, wait, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class InfraError(RuntimeError):
    """A one-line, actionable reason why a local service could not be set up or started."""


def require_tool(name: str, hint: str) -> str:
    """Path of an executable on PATH, or an :class:`InfraError` that says how to get it."""
    path = shutil.which(name)
    if path is None:
        raise InfraError(f"'{name}' not found on PATH: {hint}")
    return path


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def read_pid(pidfile: Path) -> int | None:
    """The pid recorded in ``pidfile`` if that process is still alive."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def log_tail(logfile: Path, lines: int = 5) -> str:
    try:
        return " | ".join(logfile.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_process(
    name: str,
    argv: Sequence[str],
    pidfile: Path,
    logfile: Path,
    ports: Sequence[int],
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
) -> tuple[int, bool]:
    """Start ``argv`` in its own session unless it already runs; wait until ``ready()``.

    Returns (pid, started). Raises :class:`InfraError` if a port is taken by another process,
    the process exits early, or it is not ready within ``timeout`` seconds.
    """
    pid = read_pid(pidfile)
    if pid is not None:
        _wait_ready(name, pid, logfile, ready, timeout)
        return pid, False
    for port in ports:
        if port_open(port):
            raise InfraError(
                f"{name}: port {port} is taken by another process (not started by memstream); "
                "stop it or choose another port in the MEMSTREAM_ settings"
            )
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid}\n")
    try:
        _wait_ready(name, proc.pid, logfile, ready, timeout)
    except InfraError:
        stop_process(pidfile)
        raise
    return proc.pid, True


def _wait_ready(
    name: str, pid: int, logfile: Path, ready: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise InfraError(f"{name} exited during start-up; log {logfile}: {log_tail(logfile)}")
        if ready():
            return
        time.sleep(0.5)
    raise InfraError(f"{name} not ready after {timeout:.0f}s; log {logfile}: {log_tail(logfile)}")


def stop_process(pidfile: Path, timeout: float = 30.0) -> bool:
    """Stop the process group recorded in ``pidfile`` (TERM, then KILL). True if one ran."""
    pid = read_pid(pidfile)
    pidfile.unlink(missing_ok=True)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        _signal_group(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.1)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


def run_tool(argv: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> None:
    """Run a set-up command to completion; on failure raise with its last output lines."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-4:])
        raise InfraError(f"{what} failed (exit {result.returncode}): {tail}")
