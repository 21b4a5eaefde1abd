"""A single-node Apache Kafka (KRaft, broker + controller) on 127.0.0.1, from Maven Central jars."""

from __future__ import annotations

import base64
import shutil
import tempfile
import uuid
from importlib.resources import files
from pathlib import Path

from confluent_kafka.admin import AdminClient

from infra.process import InfraError, port_open, require_tool, run_tool, start_process, stop_process
from streams.settings import Settings

POM = files("infra") / "kafka-broker" / "pom.xml"
MAIN_JAR = "kafka_2.13-{version}.jar"


def libs_dir(settings: Settings) -> Path:
    return settings.tools_dir / f"kafka-{settings.kafka_version}" / "libs"


def home(settings: Settings) -> Path:
    return settings.data_dir / "kafka"


def pidfile(settings: Settings) -> Path:
    return home(settings) / "kafka.pid"


def logfile(settings: Settings) -> Path:
    return home(settings) / "kafka.log"


def ensure_jars(settings: Settings) -> Path:
    """Copy the broker jars from Maven Central into the tools dir, once per machine and version."""
    target = libs_dir(settings)
    if (target / MAIN_JAR.format(version=settings.kafka_version)).exists():
        return target
    mvn = require_tool("mvn", "install Maven (apt-get install maven) to fetch the Kafka jars")
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=_mkdir(target.parent)))
    try:
        with tempfile.TemporaryDirectory() as workdir:
            pom = Path(workdir) / "pom.xml"
            pom.write_text(POM.read_text())
            run_tool(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom),
                    "package",
                    f"-Dkafka.version={settings.kafka_version}",
                    f"-Dkafka.libs={staging}",
                ],
                f"fetching Kafka {settings.kafka_version} jars from Maven Central",
            )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(settings: Settings) -> Path:
    """The broker's server.properties and log4j2 config under the data dir."""
    kafka_home = _mkdir(home(settings))
    port, controller = settings.kafka_port, settings.kafka_controller_port
    (kafka_home / "server.properties").write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={kafka_home / 'data'}",
                f"num.partitions={settings.partitions}",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "message.max.bytes=8388608",
                "",
            ]
        )
    )
    (kafka_home / "log4j2.properties").write_text(
        "\n".join(
            [
                "rootLogger.level = INFO",
                "rootLogger.appenderRef.out.ref = OUT",
                "appender.out.type = Console",
                "appender.out.name = OUT",
                "appender.out.layout.type = PatternLayout",
                "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                "logger.kafka.name = kafka",
                "logger.kafka.level = WARN",
                "logger.apache.name = org.apache.kafka",
                "logger.apache.level = WARN",
                "logger.started.name = kafka.server.KafkaRaftServer",
                "logger.started.level = INFO",
                "",
            ]
        )
    )
    return kafka_home / "server.properties"


def _java_argv(settings: Settings, main: str, *args: str) -> list[str]:
    java = require_tool("java", "install a JDK 17+ (apt-get install openjdk-17-jre-headless)")
    return [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        # C1 only: a local broker's load is light, and C2 compiling its hot paths cost more CPU
        # than it saved (3,000-turn ingest, 2 cores: broker 5.5 -> 1.6 CPU-s fresh, 2.3 -> 1.2
        # warm; its request threads no slower). On 2 cores that CPU is the embedder's.
        "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home(settings) / 'log4j2.properties'}",
        "-cp",
        f"{libs_dir(settings)}/*",
        main,
        *args,
    ]


def ensure_formatted(settings: Settings) -> None:
    """Format the KRaft storage once; a formatted data dir is never touched again."""
    data = home(settings) / "data"
    if (data / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    run_tool(
        _java_argv(
            settings,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            # One token: a base64 id may start with "-", which argparse would take for a flag.
            f"--cluster-id={cluster_id}",
            f"--config={home(settings) / 'server.properties'}",
        ),
        "formatting Kafka KRaft storage",
    )


def answers(settings: Settings) -> bool:
    """True when the broker serves metadata requests (quietly: this is polled during start-up)."""
    if settings.kafka_is_local and not port_open(settings.kafka_port):
        return False
    try:
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 2})
        admin.list_topics(timeout=2)
    except Exception:
        return False
    return True


def up(settings: Settings) -> tuple[int, bool]:
    """Fetch, configure, format and start the broker; wait until it answers. (pid, started)."""
    if not settings.kafka_is_local:
        raise InfraError(f"Kafka at {settings.kafka_bootstrap} is not local; nothing to start")
    ensure_jars(settings)
    config = write_config(settings)
    ensure_formatted(settings)
    return start_process(
        "kafka",
        _java_argv(settings, "kafka.Kafka", str(config)),
        pidfile(settings),
        logfile(settings),
        [settings.kafka_port, settings.kafka_controller_port],
        lambda: answers(settings),
        timeout=120,
    )


def down(settings: Settings) -> bool:
    return stop_process(pidfile(settings), timeout=60)
