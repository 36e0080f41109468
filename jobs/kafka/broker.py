"""A single-node Apache Kafka 4.x broker (KRaft) on 127.0.0.1, from jars fetched with Maven.

    python -m finfeat.jobs.kafka.broker fetch            # jars -> .cache/kafka/lib (once)
    python -m finfeat.jobs.kafka.broker run --port 19092 # in the foreground until Ctrl-C

Tests use :class:`LocalKafka` as a context manager; it formats a fresh log folder, starts
the broker, waits until it accepts connections and stops it on exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

_LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
POM = Path(__file__).with_name("pom.xml")
DEFAULT_LIB = REPO / ".cache" / "kafka" / "lib"

_LOG4J = """status = error
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
"""


class KafkaUnavailable(RuntimeError):
    """The broker's jars are missing or it did not come up; the message says what to do."""


def fetch_jars(lib: Path = DEFAULT_LIB) -> Path:
    """Resolve the broker's jars with Maven into ``lib`` (no-op when they are there)."""
    if lib.is_dir() and any(lib.glob("kafka_2.13-*.jar")):
        return lib
    if shutil.which("mvn") is None:
        raise KafkaUnavailable("Maven (mvn) is needed to fetch the Kafka broker jars; install it and retry")
    lib.mkdir(parents=True, exist_ok=True)
    cmd = ["mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime",
           f"-DoutputDirectory={lib}"]
    _LOG.info("fetching Kafka jars: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalKafka:
    """A throwaway broker: ``with LocalKafka() as kafka: kafka.bootstrap`` -> "127.0.0.1:PORT"."""

    def __init__(self, *, port: int | None = None, controller_port: int | None = None,
                 data_dir: Path | None = None, lib: Path = DEFAULT_LIB, heap: str = "512m") -> None:
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="finfeat-kafka-"))
        self.lib = lib
        self.heap = heap
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                "-cp", f"{self.lib}/*", *args]

    def start(self, timeout_s: float = 60.0) -> LocalKafka:
        if not any(self.lib.glob("kafka_2.13-*.jar")):
            raise KafkaUnavailable(f"no Kafka jars in {self.lib}: run `python -m finfeat.jobs.kafka.broker fetch`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "log4j2.properties").write_text(_LOG4J)
        props = self.data_dir / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.data_dir / 'logs'}", "num.partitions=1",
            "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1", "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1", "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true", "",
        ]))
        if not (self.data_dir / "logs" / "meta.properties").exists():
            subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", uuid.uuid4().hex[:22],
                                      "-c", str(props)), check=True, capture_output=True)
        log = (self.data_dir / "broker.log").open("ab")
        self._proc = subprocess.Popen(self._java("kafka.Kafka", str(props)), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaUnavailable(f"the broker exited with {self._proc.returncode}; see {self.data_dir / 'broker.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    _LOG.info("Kafka up on %s", self.bootstrap)
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise KafkaUnavailable(f"the broker did not accept connections within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finfeat.jobs.kafka.broker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="fetch the broker jars with Maven")
    run = sub.add_parser("run", help="run a broker in the foreground")
    run.add_argument("--port", type=int, default=19092)
    run.add_argument("--controller-port", type=int, default=19093)
    run.add_argument("--data-dir", type=Path, default=REPO / ".cache" / "kafka" / "data")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.cmd == "fetch":
        print(fetch_jars())
        return 0
    kafka = LocalKafka(port=args.port, controller_port=args.controller_port, data_dir=args.data_dir)
    kafka.start()
    print(f"Kafka on {kafka.bootstrap} (data in {args.data_dir}); Ctrl-C stops it", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
