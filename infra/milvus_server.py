"""A local Milvus standalone server, for tests of the server code path and for users who want it.

memstream's plaintext view defaults to milvus-lite (embedded); production points
``MEMSTREAM_MILVUS_URI`` at a Milvus server. The ``milvus`` PyPI package (2.3.x, the dev extra)
ships a real standalone server with an embedded etcd, as lzma-packed binaries. Its own launcher
(``milvus-server``) is not used, because on this package:

- it unpacks its 246 MB of binaries into each data directory it is given (about 8 s on a 2-core
  machine, for every fresh test dir); here they are unpacked once per machine into the tools
  dir and shared;
- the embedded etcd listens on 2379 and 2380 whatever ``--etcd-port`` says, so two servers (or
  a server and a real etcd) collide; here etcd gets its own ports from an etcd config file
  (``ETCD_CONFIG_PATH``);
- SIGTERM to the launcher leaves its child ``milvus run standalone`` running; here the server is
  the leader of its own process group and the whole group is stopped.

Run one by hand with ``python -m infra.milvus_server`` (Ctrl-C stops it).

Measured on a 2-core x86_64 machine (Milvus 2.3.5): the first start on a machine unpacks the
binaries (~8 s) and answers after ~10 s; a start on a fresh data dir answers after ~4.5 s; a
restart on a data dir used before waits ~55 s, until the previous run's etcd sessions expire
(their lease is 30 s, and etcd renews leases when it restarts). A stop takes ~0.2 s.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import lzma
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from infra.process import InfraError, port_open, read_pid

# Every port the standalone server listens on: the template's keys, the etcd peer port and the
# HTTP port of /healthz and /metrics (METRICS_PORT).
TEMPLATE_PORTS = (
    "proxy_port", "proxy_internal_port", "root_coord_port", "query_coord_port",
    "query_node_port", "index_coord_port", "index_node_port", "data_coord_port",
    "data_node_port", "etcd_port",
)  # fmt: skip
PORT_FLOOR = 20000
START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0


def package_version() -> str:
    """The installed ``milvus`` server package's version (an :class:`InfraError` if missing)."""
    try:
        return importlib.metadata.version("milvus")
    except importlib.metadata.PackageNotFoundError:
        raise InfraError(
            "the 'milvus' package (a Milvus standalone server) is not installed: "
            "pip install 'memstream[dev]' or pip install milvus==2.3.5"
        ) from None


def ensure_binaries(tools_dir: Path) -> Path:
    """Unpack the server's binaries into ``tools_dir`` once per package version; return the dir.

    They are written to a temporary directory and renamed into place, so a start that is
    interrupted, or two that race, never leave a half-unpacked set behind.
    """
    import milvus

    target = tools_dir / f"milvus-{package_version()}" / "bin"
    if (target / "milvus").is_file():
        return target
    packed = Path(milvus.__file__).parent / "data" / "bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"bin.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for source in packed.glob("*.lzma"):
        unpacked = staging / source.name.removesuffix(".lzma")
        with lzma.open(source) as src, unpacked.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        unpacked.chmod(0o755)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "milvus").is_file():
            raise
    return target


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing is bound to, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is also one it may hand to an outgoing
    connection (the start-up checks' own) before the server binds it; ports below the range
    are only ever taken by someone binding them on purpose.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports: list[int] = []
    candidates = range(PORT_FLOOR, max(low, PORT_FLOOR + 10_000))
    for port in random.sample(candidates, len(candidates)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise InfraError(f"Milvus: fewer than {count} free ports in {candidates}")


class MilvusServer:
    """A Milvus standalone on ``data_dir``: ``with MilvusServer(dir) as server: ... server.uri``.

    ``port`` is the proxy's (the port clients use); every other port is picked free at each
    start. The data (etcd, rocksmq, segments) stays in ``data_dir`` across restarts; logs are in
    ``data_dir/logs``. One server per data dir: a second start on a dir whose server still runs
    is refused. Milvus 2.3 binds its gRPC ports on every interface (it has no bind address):
    run it where the network is trusted.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        tools_dir: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        if tools_dir is None:
            from streams.settings import Settings

            tools_dir = Settings().tools_dir
        self.data_dir = data_dir.absolute()
        self.tools_dir = tools_dir
        self.timeout = timeout
        self.requested_port = port
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid (the leader of its process group) while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server's process is still alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "milvus.pid"

    @property
    def logfile(self) -> Path:
        """The server's stdout and stderr; its structured log is ``logs/standalone-*.log``."""
        return self.data_dir / "logs" / "milvus.log"

    @property
    def uri(self) -> str:
        """What ``MEMSTREAM_MILVUS_URI`` (and ``pymilvus.MilvusClient(uri=...)``) takes."""
        if not self.ports:
            raise InfraError("the Milvus server is not started")
        return f"http://127.0.0.1:{self.ports['proxy_port']}"

    def start(self) -> MilvusServer:
        """Start the server and wait until it answers; raise :class:`InfraError` with the log
        tail if it exits or does not answer within ``timeout`` seconds."""
        running = read_pid(self.pidfile)
        if running is not None:
            raise InfraError(
                f"a Milvus server (pid {running}) already runs on {self.data_dir}; stop it first"
            )
        if self.requested_port is not None and port_open(self.requested_port):
            raise InfraError(f"Milvus: port {self.requested_port} is taken by another process")
        bin_dir = ensure_binaries(self.tools_dir)
        names = [*TEMPLATE_PORTS, "etcd_peer_port", "metrics_port"]
        picked = free_ports(len(names))
        self.ports = dict(zip(names, picked, strict=True))
        if self.requested_port is not None:
            self.ports["proxy_port"] = self.requested_port
        env = self._configure(bin_dir)
        with self.logfile.open("ab") as log:
            proc = subprocess.Popen(
                [str(bin_dir / "milvus"), "run", "standalone"],
                cwd=self.data_dir,  # glog and the run files are relative to it
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._proc = proc
        self.pidfile.write_text(f"{proc.pid}\n")
        try:
            self._wait_ready(proc)
        except BaseException:
            with contextlib.suppress(InfraError):  # keep the reason it did not start
                self.stop()
            raise
        return self

    def _configure(self, bin_dir: Path) -> dict[str, str]:
        """Write ``configs/`` from the package's template; return the server's environment."""
        from milvus import MilvusServerConfig

        for sub in ("configs", "logs", "data", "run"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        config = MilvusServerConfig(
            data_dir=str(self.data_dir), **{k: self.ports[k] for k in TEMPLATE_PORTS}
        )
        try:
            config.resolve()  # binds each port to check it, renders configs/milvus.yaml
        except RuntimeError as exc:  # a port taken since it was picked
            raise InfraError(f"Milvus: {exc}") from exc
        etcd_config = self.data_dir / "configs" / "embedEtcd.yaml"
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer_port']}"
        etcd_config.write_text(
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        library_path = os.pathsep.join(
            p for p in (str(bin_dir), os.environ.get("LD_LIBRARY_PATH")) if p
        )
        return {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "MILVUSCONF": str(self.data_dir / "configs"),
            "ETCD_CONFIG_PATH": str(etcd_config),
            "METRICS_PORT": str(self.ports["metrics_port"]),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": library_path,
            # On stop, a query node waits (30 s by default) for its loaded segments to move to
            # another node; a standalone has none, and the data is safe in its log anyway.
            "QUERYNODE_GRACEFULSTOPTIMEOUT": "0",
        }

    def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['metrics_port']}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200 and b"OK" in response.read()
        except OSError:
            return False

    def _answers(self) -> bool:
        """A real client call: /healthz says OK a moment before the proxy serves requests."""
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        try:
            client = MilvusClient(uri=self.uri, timeout=5)
        except MilvusException:
            return False
        try:
            client.list_collections()
        except MilvusException:
            return False
        finally:
            client.close()
        return True

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise InfraError(
                    f"Milvus exited during start-up (exit {proc.returncode}); {self.log_excerpt()}"
                )
            if self._healthy() and self._answers():
                return
            time.sleep(0.5)
        raise InfraError(f"Milvus not ready after {self.timeout:.0f}s; {self.log_excerpt()}")

    def log_excerpt(self, errors: int = 3) -> str:
        """Where the log is and what it says went wrong: its first error lines (a failed start
        ends in a Go panic's stack, which says nothing), then its last line."""
        try:
            text = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return f"no log at {self.logfile}"
        picked = [line for line in text if line.startswith("panic:") or "[ERROR]" in line]
        picked = picked[:errors] + text[-1:]
        return f"log {self.logfile}: " + " | ".join(line[:300] for line in picked)

    def stop(self) -> None:
        """Stop the server's whole process group (TERM, then KILL after 30 s); raise
        :class:`InfraError` if a port it used still answers afterwards."""
        if self._proc is not None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._group_alive():
                self._signal(signal.SIGKILL)
                while self._group_alive():
                    time.sleep(0.1)
            self._proc = None
            self.pidfile.unlink(missing_ok=True)
        taken = [p for p in self.ports.values() if port_open(p)]
        if taken:
            raise InfraError(f"Milvus stopped but ports {taken} still answer; {self.log_excerpt()}")

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _group_alive(self) -> bool:
        """Whether any process of the server's group still runs (the leader reaped first)."""
        assert self._proc is not None
        self._proc.poll()
        try:
            os.killpg(self._proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a server in the foreground until Ctrl-C or SIGTERM, for trying the server path."""
    import argparse
    import sys

    from streams.settings import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m infra.milvus_server", description=main.__doc__)
    parser.add_argument("--data", type=Path, default=settings.data_dir / "milvus-server")
    parser.add_argument("--port", type=int, default=19530, help="the proxy's (clients') port")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with MilvusServer(args.data, args.port, tools_dir=settings.tools_dir) as server:
        print(f"Milvus {package_version()} answers at {server.uri} (data {server.data_dir})")
        print(f"  MEMSTREAM_MILVUS_URI={server.uri} memstream serve   # Ctrl-C stops the server")
        with contextlib.suppress(KeyboardInterrupt):
            while server.running:
                time.sleep(1)


if __name__ == "__main__":
    main()
