"""Helpers for the Kafka + Prism streaming tests: a broker, the stream job as a process, checks.

The job runs as ``python -m finfeat.jobs.cli stream`` in its own process group (it starts
Prism as a child), so a test can kill the whole job with one signal, as a crash would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.conftest import REPO, SPARKOV_TEST, TOKEN_KEY, load_events, unavailable

PRISM = REPO / ".cache" / "prism" / "bin" / "prism"
KAFKA_LIB = REPO / ".cache" / "kafka" / "lib"
APP_ID = "finfeat-stream-test"
#: every job of these tests: bound on out-of-orderness and a short idle stop
BOUND_S = 120
IDLE_S = 4


def kafka_missing(*, client: bool = True) -> list[str]:
    """What a local broker needs and this machine lacks: Kafka's jars, and (``client``) the
    confluent-kafka client; each with how to get it."""
    missing = []
    if not any(KAFKA_LIB.glob("kafka_2.13-*.jar")):
        missing.append(f"Kafka jars in {KAFKA_LIB} (python -m finfeat.jobs.kafka.broker fetch)")
    if client:
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            missing.append("confluent-kafka (pip install -e '.[stream]')")
    return missing


def require_stream_stack() -> None:
    """Skip when Kafka's jars, Prism or confluent-kafka are missing, unless CI is set: then fail."""
    missing = kafka_missing()
    if not PRISM.exists():
        missing.insert(1, f"the Prism binary {PRISM} (make prism)")
    if missing:
        unavailable("streaming stack unavailable: " + "; ".join(missing))


def sparkov_events(n: int) -> pa.Table:
    """The first ``n`` events (by event time) of the public Sparkov test file, canonical."""
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"])
    return events.sort_by([("event_time", "ascending"), ("txn_id", "ascending")]).slice(0, n)


def stream_args(bootstrap: str, topic: str, warehouse: Path, *, idle_s: float | None = IDLE_S,
                commit_every_s: float = 1.0, extra: tuple[str, ...] = ()) -> list[str]:
    args = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", bootstrap, "--topic", topic,
            "--warehouse", str(warehouse), "--app-id", APP_ID, "--bound-seconds", str(BOUND_S),
            "--commit-every-seconds", str(commit_every_s), f"--prism_location={PRISM}", *extra]
    if idle_s is not None:
        args += ["--stop-after-idle", str(idle_s)]
    return args


def start_stream(bootstrap: str, topic: str, warehouse: Path, log: Path, **kwargs: object) -> subprocess.Popen:
    """The stream job as a process in its own process group (Prism included), output in ``log``."""
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY.decode(), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(stream_args(bootstrap, topic, warehouse, **kwargs), env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The job's exit code; on timeout the job's process group is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"the stream job did not finish within {timeout_s:.0f} s; its log:\n{tail(log)}")


def run_stream(bootstrap: str, topic: str, warehouse: Path, log: Path, *, timeout_s: float = 120,
               **kwargs: object) -> None:
    """Run the job to its idle stop; fail with its log if it does not exit 0."""
    proc = start_stream(bootstrap, topic, warehouse, log, **kwargs)
    rc = wait_for(proc, log, timeout_s)
    assert rc == 0, f"stream job exited {rc}; its log:\n{tail(log)}"


def tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def commits(path: Path) -> int:
    """How many commits the Delta table at ``path`` has (0 when it does not exist yet)."""
    from deltalake import DeltaTable

    return DeltaTable(str(path)).version() + 1 if DeltaTable.is_deltatable(str(path)) else 0


def wait_until(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None,  # noqa: ANN001
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the stream job exited ({proc.returncode}) before {what}; its log:\n"
                        f"{tail(log) if log else ''}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_group(proc)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}"
                        + (f"; the job's log:\n{tail(log)}" if log else ""))
        time.sleep(0.2)


def identity_problems(rows: pa.Table, events: pa.Table) -> list[str]:
    """The identity columns of the feature rows against the events they came from."""
    columns = ["txn_id", "card_token", "merchant_id", "event_time", "amount_minor", "currency", "channel",
               "merchant_category", "is_fraud"]
    ours = rows.select(columns).sort_by("txn_id")
    theirs = events.select(columns).cast(ours.schema).sort_by("txn_id")
    problems = [] if ours.equals(theirs) else ["identity columns differ from the events"]
    days = pc.divide(rows.column("event_time").cast(pa.int64()), 86_400_000_000).cast(pa.int32())
    if not pc.all(pc.equal(rows.column("event_date").cast(pa.int32()), days)).as_py():
        problems.append("event_date is not the UTC date of event_time")
    return problems
