"""The stream job on Flink (PyFlink) against a real broker: parity with the batch engine on the
embedded mini cluster and on a standalone cluster, dead letters, a TaskManager killed mid-stream.

Needs ``make flink`` (the Flink venv and the Kafka connector jar); skipped without it, failed
when CI is set. The job runs as ``finfeat stream --engine flink``, as a user runs it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from finfeat.jobs.delta import read_table
from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import REPO, TOKEN_KEY, unavailable
from tests.oracle import compare_features
from tests.stream_fixtures import (
    kafka_missing,
    APP_ID,
    BOUND_S,
    commits,
    identity_problems,
    kill_group,
    sparkov_events,
    tail,
    wait_for,
    wait_until,
)

SPEC = FeatureSpec.default()


def require_flink_stack() -> None:
    from finfeat.jobs.flink import env as flink_env

    missing = []
    try:
        flink_env.require()
    except flink_env.FlinkUnavailable as exc:
        missing.append(str(exc))
    missing += kafka_missing(client=False)
    if missing:
        unavailable("Flink stack unavailable: " + "; ".join(missing))


@pytest.fixture(scope="module")
def kafka():  # noqa: ANN201
    require_flink_stack()
    from finfeat.jobs.kafka.broker import LocalKafka

    with LocalKafka() as broker:
        yield broker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN001, ANN201
    require_flink_stack()
    from finfeat.jobs.flink.cluster import LocalFlinkCluster

    with LocalFlinkCluster(workdir=tmp_path_factory.mktemp("flink"), slots=2) as c:
        yield c


def _produce(events: pa.Table, bootstrap: str, topic: str, **kwargs: object) -> None:
    from finfeat.jobs.produce import produce

    assert produce(events, bootstrap=bootstrap, topic=topic, **kwargs) == events.num_rows


def _start(bootstrap: str, topic: str, wh: Path, log: Path, *, master: str | None = None, parallelism: int = 1,
           idle_s: float | None = 4, bound_s: float = BOUND_S, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--engine", "flink", "--bootstrap", bootstrap,
            "--topic", topic, "--warehouse", str(wh), "--app-id", APP_ID, "--bound-seconds", str(bound_s),
            "--commit-every-seconds", "1", "--checkpoint-interval-ms", "1000",
            *(["--stop-after-idle", str(idle_s)] if idle_s is not None else []),
            "--parallelism", str(parallelism), "--buckets", str(parallelism), *extra]
    if master:
        args += ["--flink-master", master]
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY.decode(), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run(bootstrap: str, topic: str, wh: Path, log: Path, *, timeout_s: float = 420, **kwargs: object) -> None:
    proc = _start(bootstrap, topic, wh, log, **kwargs)
    rc = wait_for(proc, log, timeout_s)
    assert rc == 0, f"the Flink stream job exited {rc}; its log:\n{tail(log)}"


def _features(wh: Path) -> pa.Table:
    return read_table(wh / "features")


def _assert_equals_batch(got: pa.Table, events: pa.Table) -> None:
    assert got.num_rows == events.num_rows, f"{got.num_rows} feature rows for {events.num_rows} events"
    assert pc.count_distinct(got.column("txn_id")).as_py() == got.num_rows, "duplicate feature rows"
    problems = compare_features(got.select(["txn_id", *SPEC.names]), compute_features(events, SPEC))
    assert problems == [], problems[:5]
    assert identity_problems(got, events) == []


def test_mini_cluster_in_order_equals_batch(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    events = sparkov_events(600)
    _produce(events, kafka.bootstrap, "flink-mini-in-order")
    _run(kafka.bootstrap, "flink-mini-in-order", tmp_path / "wh", tmp_path / "job.log", parallelism=1)
    _assert_equals_batch(_features(tmp_path / "wh"), events)
    assert not DeltaTable.is_deltatable(str(tmp_path / "wh" / "dead_letters")), "unexpected dead letters"
    assert DeltaTable(str(tmp_path / "wh" / "features")).transaction_version(f"{APP_ID}:features") >= 1


def test_drain_of_a_dense_stream_after_the_source_went_idle_leaves_every_row_once(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    """Events 1 ms apart, a 1 s bound: at the idle stop the events of the last second still wait
    for the watermark, and the source has been quiet for longer than the bound. The drain's
    end-of-time watermark must still fire their timers (it was dropped while the source was idle)."""
    events = _dense(3000)
    _produce(events, kafka.bootstrap, "flink-dense-drain")
    _run(kafka.bootstrap, "flink-dense-drain", tmp_path / "wh", tmp_path / "job.log", bound_s=1, idle_s=4)
    _assert_equals_batch(_features(tmp_path / "wh"), events)
    assert not DeltaTable.is_deltatable(str(tmp_path / "wh" / "dead_letters")), "unexpected dead letters"


def _dense(n: int) -> pa.Table:
    """``n`` Sparkov events 1 ms apart."""
    events = sparkov_events(n)
    t0 = events.column("event_time")[0].as_py()
    dense = pa.array([t0 + timedelta(milliseconds=i) for i in range(events.num_rows)],
                     events.schema.field("event_time").type)
    return events.set_column(events.schema.get_field_index("event_time"), "event_time", dense)


@pytest.mark.parametrize("where", ["mini", "cluster"])
def test_stop_on_sigterm_keeps_what_waits_for_the_watermark_and_a_resumed_job_completes_it(
        kafka, tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:  # noqa: ANN001
    """A job without --stop-after-idle, its source quiet for longer than the bound (so Flink
    treats it as idle), stopped with SIGTERM to ``finfeat stream``'s process group (as a Ctrl-C
    in a terminal): it stops with a savepoint, without a drain, and the events still waiting for
    the watermark stay in it; a job resumed from that savepoint commits them: every row once,
    nothing lost, no dead letter. On the mini cluster and on a standalone one."""
    master = request.getfixturevalue("cluster").master if where == "cluster" else None
    events = _dense(3000)
    topic, wh, log = f"flink-sigterm-stop-{where}", tmp_path / "wh", tmp_path / "job.log"
    _produce(events, kafka.bootstrap, topic)
    proc = _start(kafka.bootstrap, topic, wh, log, bound_s=1, idle_s=None, master=master)
    try:
        # the final events' rows land; the last second's events wait for a watermark that does not come
        wait_until(lambda: commits(wh / "features") >= 1, 300, "the first features commit", proc, log)
        before = -1
        while (now := _features(wh).num_rows) != before:  # stable: the source has been idle for > 1 s
            before = now
            time.sleep(4)
        os.killpg(proc.pid, signal.SIGTERM)
        assert wait_for(proc, log, 180) == 0, tail(log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    text = log.read_text()
    assert "stopped on request" in text, tail(log)
    savepoint = text.split("stopped on request; savepoint ", 1)[1].split()[0]
    first = _features(wh)
    assert 0 < first.num_rows < events.num_rows, f"{first.num_rows} rows before the resume"
    assert pc.count_distinct(first.column("txn_id")).as_py() == first.num_rows
    _run(kafka.bootstrap, topic, wh, log, bound_s=1, idle_s=4, master=master, extra=("--from-checkpoint", savepoint))
    _assert_equals_batch(_features(wh), events)
    assert not DeltaTable.is_deltatable(str(wh / "dead_letters")), "unexpected dead letters"


@pytest.mark.parametrize("parallelism", [1, 2])
def test_cluster_shuffled_within_bound_equals_batch(kafka, cluster, tmp_path: Path, parallelism: int) -> None:  # noqa: ANN001
    events = sparkov_events(600)
    topic = f"flink-cluster-shuffled-{parallelism}"
    _produce(events, kafka.bootstrap, topic, disorder_us=BOUND_S * 1_000_000, seed=11)
    _run(kafka.bootstrap, topic, tmp_path / "wh", tmp_path / "job.log", master=cluster.master,
         parallelism=parallelism)
    _assert_equals_batch(_features(tmp_path / "wh"), events)
    assert not DeltaTable.is_deltatable(str(tmp_path / "wh" / "dead_letters")), "unexpected dead letters"


def test_duplicate_late_and_malformed_messages_are_dead_letters(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    from confluent_kafka import Producer

    from finfeat.jobs.kafka.messages import encode_events

    events = sparkov_events(300)
    topic = "flink-dead-letters"
    _produce(events, kafka.bootstrap, topic)
    wh, log = tmp_path / "wh", tmp_path / "job.log"
    proc = _start(kafka.bootstrap, topic, wh, log, idle_s=12)
    try:
        first = events.column("txn_id")[0].as_py()
        wait_until(lambda: commits(wh / "features") and first in set(_features(wh).column("txn_id").to_pylist()),
                   300, "the first features commit", proc, log)
        duplicate = encode_events(events.slice(5, 1))
        t0 = events.column("event_time")[0].as_py()
        late = events.slice(0, 1)
        late = late.set_column(late.schema.get_field_index("txn_id"), "txn_id", pa.array(["late-txn-1"]))
        late = late.set_column(late.schema.get_field_index("event_time"), "event_time",
                               pa.array([t0 - timedelta(days=1)], late.schema.field("event_time").type))
        producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True, "acks": "all"})
        for key, value in [*duplicate, *encode_events(late), (b"k", b"{not json")]:
            producer.produce(topic, key=key, value=value, partition=0)
        assert producer.flush(30) == 0
        assert wait_for(proc, log, 300) == 0, tail(log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    _assert_equals_batch(_features(wh), events)
    dead = read_table(wh / "dead_letters")
    got = sorted(zip(dead.column("reason").to_pylist(), dead.column("txn_id").to_pylist(),
                     dead.column("source_row").to_pylist()))
    dup_txn = events.column("txn_id")[5].as_py()
    assert got == [("duplicate_txn_id", dup_txn, 300), ("late", "late-txn-1", -1), ("unparseable", None, 302)], got
    stages = dict(zip(dead.column("reason").to_pylist(), dead.column("stage").to_pylist()))
    assert stages == {"duplicate_txn_id": "dedup", "late": "late", "unparseable": "read"}
    assert set(dead.column("source").to_pylist()) == {f"{topic}/0", "stream"}


def _job_id(cluster) -> str:  # noqa: ANN001
    running = [j["id"] for j in cluster.get("/jobs").get("jobs", []) if j["status"] == "RUNNING"]
    return running[0] if running else ""


def test_taskmanager_killed_mid_stream_leaves_every_row_once(kafka, cluster, tmp_path: Path) -> None:  # noqa: ANN001
    events = sparkov_events(1500)
    topic = "flink-kill"
    wh, log = tmp_path / "wh", tmp_path / "job.log"
    first, rest = events.slice(0, 500), events.slice(500)
    _produce(first, kafka.bootstrap, topic)
    proc = _start(kafka.bootstrap, topic, wh, log, master=cluster.master, idle_s=8)
    try:
        wait_until(lambda: bool(_job_id(cluster)), 180, "the job to run", proc, log)
        job = _job_id(cluster)
        wait_until(lambda: commits(wh / "features") >= 1, 300, "the first features commit", proc, log)
        wait_until(lambda: cluster.get(f"/jobs/{job}/checkpoints")["counts"]["completed"] >= 1, 120,
                   "a completed checkpoint", proc, log)
        # more events arrive while the TaskManager dies: the job restarts from its last checkpoint
        sender = threading.Thread(target=_produce, args=(rest, kafka.bootstrap, topic), kwargs={"rate": 500.0})
        sender.start()
        cluster.kill_taskmanager()
        cluster.start_taskmanager()
        sender.join(60)
        assert wait_for(proc, log, 420) == 0, tail(log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    _assert_equals_batch(_features(wh), events)
    exceptions = cluster.get(f"/jobs/{job}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries"), "no failure recorded: the kill did not hit the job"


def _source_records(cluster, job: str) -> int:  # noqa: ANN001
    """Records the job's Kafka source vertex emitted (Flink's own count, kept after the job ends)."""
    vertices = cluster.get(f"/jobs/{job}")["vertices"]
    source = next(v for v in vertices if v["name"].startswith("Source:"))
    return int(source["metrics"]["write-records"])


def test_resume_from_retained_checkpoint_reads_only_what_came_after(kafka, cluster, tmp_path: Path) -> None:  # noqa: ANN001
    events = sparkov_events(900)
    before, after = events.slice(0, 600), events.slice(600)
    topic = "flink-resume"
    wh, log = tmp_path / "wh", tmp_path / "job.log"
    checkpoints = tmp_path / "checkpoints"
    _produce(before, kafka.bootstrap, topic)
    proc = _start(kafka.bootstrap, topic, wh, log, master=cluster.master, idle_s=3600,
                  extra=("--checkpoint-dir", str(checkpoints)))
    try:
        wait_until(lambda: bool(_job_id(cluster)), 180, "the job to run", proc, log)
        job = _job_id(cluster)
        wait_until(lambda: _source_records(cluster, job) == before.num_rows, 300, "the first messages read",
                   proc, log)
        done = cluster.get(f"/jobs/{job}/checkpoints")["counts"]["completed"]
        wait_until(lambda: cluster.get(f"/jobs/{job}/checkpoints")["counts"]["completed"] >= done + 2, 120,
                   "a checkpoint after everything was read", proc, log)
        cluster.request("PATCH", f"/jobs/{job}?mode=cancel")
        wait_until(lambda: cluster.get(f"/jobs/{job}")["state"] == "CANCELED", 120, "the job to be cancelled")
        wait_for(proc, log, 120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    retained = cluster.get(f"/jobs/{job}/checkpoints")["latest"]["completed"]["external_path"]
    assert Path(retained.removeprefix("file:")).is_dir(), retained
    _produce(after, kafka.bootstrap, topic)
    proc = _start(kafka.bootstrap, topic, wh, log, master=cluster.master, idle_s=6,
                  extra=("--checkpoint-dir", str(checkpoints), "--from-checkpoint", retained))
    try:
        wait_until(lambda: bool(_job_id(cluster)), 180, "the resumed job to run", proc, log)
        resumed = _job_id(cluster)
        assert wait_for(proc, log, 420) == 0, tail(log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert resumed != job
    assert _source_records(cluster, resumed) == after.num_rows, "the resumed job re-read messages of the checkpoint"
    _assert_equals_batch(_features(wh), events)


def test_online_store_equals_batch_materialization(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    from finfeat.jobs.online import lookup_many, materialize
    from finfeat.jobs.online.sqlite import SqliteOnlineStore
    from finfeat.schemas.events import EVENT_SCHEMA
    from tests.test_stream_online import SPEC as SHORT, _candidates, _canonical, _spec_file

    events = sparkov_events(800)
    topic = "flink-online"
    _produce(events, kafka.bootstrap, topic, disorder_us=BOUND_S * 1_000_000, seed=13)
    url = f"sqlite:{tmp_path / 'online.db'}"
    _run(kafka.bootstrap, topic, tmp_path / "wh", tmp_path / "job.log",
         extra=("--feature-spec", str(_spec_file(tmp_path)), "--online-store", url))
    rows = read_table(tmp_path / "wh" / "features")
    assert compare_features(rows.select(["txn_id", *SHORT.names]), compute_features(events, SHORT)) == []
    reference = SqliteOnlineStore(tmp_path / "batch.db", SHORT)
    streamed = SqliteOnlineStore(tmp_path / "online.db", SHORT, create=False)
    try:
        materialize(reference, events.select(EVENT_SCHEMA.names), SHORT)
        want, have = _canonical(reference), _canonical(streamed)
        assert len(want) == len(set(events.column("card_token").to_pylist())) + len(
            set(events.column("merchant_id").to_pylist()))
        assert set(have) == set(want), sorted(set(have) ^ set(want))[:5]
        different = [k for k in want if have[k] != want[k]]
        assert different == [], f"{len(different)} states differ, e.g. {different[:3]}"
        candidates = _candidates(events)
        ours, theirs = lookup_many(streamed, SHORT, candidates), lookup_many(reference, SHORT, candidates)
        assert [(r.features, r.as_of_us, r.entity_as_of_us) for r in ours] == \
               [(r.features, r.as_of_us, r.entity_as_of_us) for r in theirs]
    finally:
        reference.close()
        streamed.close()


def test_online_store_failure_ends_the_job_with_an_error(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    """The store goes away mid-stream and stays away past --store-retry-seconds: the job must end
    (exit 1, the store's error named), not have Flink restart the failing task forever."""
    from finfeat.jobs.online.base import EntityState
    from finfeat.jobs.online.redis_store import RedisOnlineStore
    from tests.online_fixtures import running_redis

    events = sparkov_events(400)
    topic, wh, log = "flink-online-failure", tmp_path / "wh", tmp_path / "job.log"
    _produce(events.slice(0, 200), kafka.bootstrap, topic)
    with running_redis(tmp_path / "redis") as server:
        proc = _start(kafka.bootstrap, topic, wh, log, idle_s=None,
                      extra=("--online-store", server.url, "--store-retry-seconds", "3"))
        try:
            probe = RedisOnlineStore(server.url, SPEC)
            card = events.column("card_token")[0].as_py()
            wait_until(lambda: isinstance(probe.read_states([("card", card)])[0], EntityState), 300,
                       "the first online-store write", proc, log)
            probe.close()
            server.kill()
            _produce(events.slice(200), kafka.bootstrap, topic)
            rc = wait_for(proc, log, 240)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    assert rc == 1, f"the job exited {rc}; its log:\n{tail(log)}"
    text = log.read_text(errors="replace")
    assert "the online store failed and the job stopped" in text and "unavailable" in text, tail(log)


def test_engine_flink_without_its_environment_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from finfeat.jobs.cli import main

    monkeypatch.setenv("FINFEAT_FLINK_VENV", str(tmp_path / "no-venv"))
    monkeypatch.setenv("FINFEAT_TOKEN_KEY", TOKEN_KEY.decode())
    base = ["stream", "--engine", "flink", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--warehouse",
            str(tmp_path / "wh")]
    assert main(base) == 2
    assert "run `make flink`" in capsys.readouterr().err
    assert main([*base, "--runner=PrismRunner"]) == 2  # Beam flags mean nothing to the Flink job
    assert "do not apply with --engine flink" in capsys.readouterr().err
    assert not (tmp_path / "wh").exists()
