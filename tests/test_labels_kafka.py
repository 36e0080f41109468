"""Labels through a Kafka topic into the online store: ``finfeat produce --labels`` and
``finfeat store-labels --topic``, with a real broker, SQLite and a real redis-server.

* the labelled world's feed (see ``tests/label_fixtures.py``) published as label messages and
  consumed into a store: the replay of the transactions, each looked up before it is written,
  equals the backfill's Delta rows with the same feed field by field, and the state equals what
  the backfill materialized;
* a consumer killed with SIGKILL after writing a batch but before committing its offsets, then
  restarted, leaves the same state as labels written directly, and each dead letter once;
* malformed messages become dead letters with a reason (JSON Lines and the warehouse's Delta
  table), ``read = accepted + dead letters``, no card number in any of them, and a message's
  fields are judged exactly as the same record in a labels file;
* a store that stops answering exits 4 without committing the batch, and a restart reads it;
  SIGTERM finishes the batch and exits 0.

Skipped when Kafka's jars or confluent-kafka are missing, unless CI is set (then they fail).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from finfeat.jobs.kafka.messages import decode_labels, encode_labels
from finfeat.jobs.online import open_store
from finfeat.jobs.online.base import Label, OnlineStore
from finfeat.jobs.online.redis_store import RedisOnlineStore
from finfeat.jobs.online.sqlite import SqliteOnlineStore
from finfeat.jobs.sources import read_labels_file
from finfeat.schemas.events import TransactionEvent, events_to_table
from finfeat.transforms.labels import parse_labels
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import REPO, unavailable
from tests.label_fixtures import HOUR, SPEC, _iso, replay_with_lookups, snapshot, world  # noqa: F401
from tests.online_fixtures import make_store, redis_server, running_redis  # noqa: F401  (fixtures)
from tests.stream_fixtures import kafka_missing

CARD = "4111 1111 1111 1111"
SMALL = FeatureSpec.from_dict({"features": [
    {"entity": "card", "agg": "count", "window": "1h"},
    {"entity": "merchant", "agg": "fraud_rate", "window": "2d", "delay": "1d"},
]})


def _require_kafka() -> None:
    missing = kafka_missing()
    if missing:
        unavailable("Kafka unavailable: " + "; ".join(missing))


@pytest.fixture(scope="module")
def kafka():  # noqa: ANN201
    _require_kafka()
    from finfeat.jobs.kafka.broker import LocalKafka

    with LocalKafka() as broker:
        yield broker


# ------------------------------------------------------------------------------------ helpers

def _spec_file(tmp_path: Path, spec: FeatureSpec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "features": [f.model_dump(exclude_none=True)
                                                                for f in spec.features]}))
    return path


def _store_flags(store: OnlineStore) -> list[str]:
    if isinstance(store, SqliteOnlineStore):
        return ["--store", f"sqlite:{store.path}"]
    assert isinstance(store, RedisOnlineStore)
    return ["--store", store.url, "--namespace", store.namespace]


def _consumer_args(store: OnlineStore, spec_path: Path, bootstrap: str, topic: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finfeat.jobs.cli", "store-labels", *_store_flags(store),
            "--feature-spec", str(spec_path), "--bootstrap", bootstrap, "--topic", topic, *extra]


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout_s,
                          env={**os.environ, **(env or {})})


def _report(proc: subprocess.CompletedProcess) -> dict[str, object]:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the result is in
    done = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    done[topic].result(30)


def _send(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """How many messages of ``topic`` the group has committed (the sum of its offsets)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(max(tp.offset, 0) for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10))
    finally:
        c.close()


def _feed_labels(path: Path) -> pa.Table:
    """A labels file as the backfill reads it (no dead letters expected)."""
    parts = []
    for raw, unreadable in read_labels_file(path, run_id="t", recorded_at_us=0):
        labels, dead = parse_labels(raw, source=path.name, run_id="t", recorded_at_us=0)
        assert unreadable.num_rows == 0 and dead.num_rows == 0
        parts.append(labels)
    return pa.concat_tables(parts)


def _label(txn_id: object, fraud: object, when: object, **extra: object) -> bytes:
    return json.dumps({"schema": "finfeat.label.v1", "txn_id": txn_id, "is_fraud": fraud, "label_time": when,
                       **extra}).encode()


# ------------------------------------------------------------------------- online = batch

def test_labels_from_a_topic_serve_what_the_backfill_computes(kafka, make_store, world: dict[str, object],  # noqa: ANN001
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from finfeat.jobs.cli import main

    topic = f"feed-{make_store.backend}"
    labels: list[Label] = world["labels"]
    assert main(["produce", "--labels", str(world["feed_path"]), "--bootstrap", kafka.bootstrap,
                 "--topic", topic]) == 0
    assert f"published {len(labels):,} labels" in capsys.readouterr().out
    store = make_store(SPEC)
    report = _report(_run(_consumer_args(store, _spec_file(tmp_path, SPEC), kafka.bootstrap, topic,
                                         "--stop-after-idle", "2", "--max-batch", "400")))
    assert (report["messages_read"], report["labels_accepted"], report["dead_letters"]) == (len(labels), len(labels), 0)
    assert report["batches"] >= 2 and report["stopped_by"] == "idle"
    # every label is in the store before its transaction: the store counts each only once known
    replay_with_lookups(store, world)
    backfilled = open_store(world["store_url"], SPEC, create=False)
    try:
        assert snapshot(store) == snapshot(backfilled)
    finally:
        backfilled.close()


# ----------------------------------------------------------------------- kill -9 and restart

def test_a_consumer_killed_mid_topic_and_restarted_leaves_the_same_state(kafka, make_store,  # noqa: ANN001
                                                                          world: dict[str, object],
                                                                          tmp_path: Path) -> None:
    topic = f"kill-{make_store.backend}"
    _create_topic(kafka.bootstrap, topic, 3)
    messages = encode_labels(_feed_labels(world["feed_path"]))
    # a malformed message every 97 labels: some in the batch the kill interrupts
    mixed: list[tuple[bytes | None, bytes | None]] = []
    for i in range(0, len(messages), 97):
        mixed += messages[i:i + 97]
        mixed.append((f"bad-{i}".encode(), b"not a label %d" % i))
    _send(kafka.bootstrap, topic, mixed)
    n_bad = len(mixed) - len(messages)
    events = world["events"]
    direct = make_store(SPEC)
    direct.write(events)
    direct.write_labels(world["labels"])
    store = make_store(SPEC)
    store.write(events)
    args = _consumer_args(store, _spec_file(tmp_path, SPEC), kafka.bootstrap, topic, "--stop-after-idle", "2",
                          "--max-batch", "300", "--dead-letters", str(tmp_path / "dead.jsonl"))
    killed = _run(args, env={"FINFEAT_TEST_KILL_AT": "labels:before-commit:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = _committed(kafka.bootstrap, "finfeat-store-labels-" + topic, topic)
    assert 0 < done < len(mixed)   # batches 1-2 committed, batch 3 written but not committed
    assert snapshot(store) != snapshot(direct)
    report = _report(_run(args))
    assert report["messages_read"] == len(mixed) - done     # from the committed offsets on
    assert report["messages_read"] == report["labels_accepted"] + report["dead_letters"]
    assert _committed(kafka.bootstrap, "finfeat-store-labels-" + topic, topic) == len(mixed)
    assert snapshot(store) == snapshot(direct)
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(lines) == n_bad, "each malformed message is in the dead-letter file once"
    assert len({(d["source"], d["source_row"]) for d in lines}) == n_bad
    assert {d["reason"] for d in lines} == {"unparseable"}
    assert {d["source"] for d in lines} <= {f"{topic}/{p}" for p in range(3)}


# --------------------------------------------------------------------------------- dead letters

def _malformed_topic() -> tuple[list[tuple[bytes | None, bytes | None]], dict[str, int]]:
    t = "2024-01-02T00:00:00Z"
    messages = [
        (b"t1", _label("t1", True, t, source="a.csv")),
        (b"x", f'{{"txn_id": "{CARD}", oops'.encode()),                  # not JSON (with a card number)
        (b"x", b'["a", "list"]'),                                          # JSON, not an object
        (b"x", json.dumps({"schema": "finfeat.txn.v1", "txn_id": "t9"}).encode()),  # a transaction
        (b"x", json.dumps({"txn_id": "t9", "is_fraud": True, "label_time": t}).encode()),  # no schema
        (b"x", _label(None, True, t)),                                     # missing txn id
        (b"t2", _label("t2", "maybe", t)),                                 # not a label
        (b"t2", _label("t2", True, "yesterday")),                          # not a time
        (b"x", _label(CARD, True, t)),                                     # a card number as txn id
        (b"t2", _label("t2", False, t, source=f"feed {CARD}")),            # a card number as source
        (b"t2", _label("t2", False, t, source="")),                        # an empty source
        (b"x", None),                                                      # a tombstone
        (b"x", _label("t" * 300, True, t)),                                # too long
        (b"t3", _label("t3", 1, "2024-01-01T12:00:00+02:00")),             # good, no source, an offset
        (b"t1", _label("t1", False, "2024-01-02T00:00:00.000001Z", source="b.csv")),  # later: wins
        (b"x", b"\xff\xfe{}"),                                             # not UTF-8
    ]
    reasons = {"unparseable": 6, "missing_field": 1, "wrong_type": 2, "bad_timestamp": 1,
               "card_number_in_field": 2, "field_too_long": 1}
    return messages, reasons


def test_malformed_messages_are_dead_letters_and_runs_reconcile(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    from deltalake import DeltaTable

    topic = "malformed"
    messages, reasons = _malformed_topic()
    _send(kafka.bootstrap, topic, messages)
    store = open_store(f"sqlite:{tmp_path / 'online.db'}", SMALL)
    spec_path = _spec_file(tmp_path, SMALL)
    dead_file, wh = tmp_path / "dead.jsonl", tmp_path / "wh"
    sinks = ["--dead-letters", str(dead_file), "--warehouse", str(wh)]
    base = _consumer_args(store, spec_path, kafka.bootstrap, topic, "--stop-after-idle", "2", *sinks)
    n_dead = sum(reasons.values())
    for group, new in (("g1", n_dead), ("g2", 0)):   # another group reads it all again
        report = _report(_run([*base, "--group", group]))
        assert (report["messages_read"], report["labels_accepted"], report["dead_letters"]) == (16, 3, n_dead)
        assert report["dead_letters_by_reason"] == reasons
        assert report["dead_letters_new"] == {"file": new, "warehouse": new}
    report = _report(_run([*base, "--group", "g1"]))    # the group's offsets are committed: nothing new
    assert report["messages_read"] == 0
    in_file = dead_file.read_text()
    rows = [json.loads(line) for line in in_file.splitlines()]
    table = DeltaTable(str(wh / "dead_letters")).to_pyarrow_table()
    assert len(rows) == table.num_rows == n_dead
    assert sorted(r["source_row"] for r in rows) == sorted(table.column("source_row").to_pylist()) == \
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15]
    assert {r["source"] for r in rows} == {f"{topic}/0"} and {r["stage"] for r in rows} == {"labels"}
    everything = in_file + json.dumps(table.to_pylist(), default=str)
    assert "4111" not in everything and "<card-number>" in everything
    state = {t: (lab.is_fraud, lab.time_us, lab.source) for t, lab in _labels(store, ["t1", "t3"]).items()}
    assert state == {"t1": (False, 1704153600000001, "b.csv"), "t3": (True, 1704103200000000, topic)}
    store.close()


def _labels(store: OnlineStore, txn_ids: list[str]) -> dict[str, Label]:
    """The store's labels of ``txn_ids``, through a merchant that holds those transactions."""
    store.write(events_to_table([TransactionEvent(t, "c", "m", None, 100, "USD", 1_704_067_200_000_000 + i, "pos")
                                 for i, t in enumerate(txn_ids)]))
    return store.read_state("merchant", "m").labels


def test_a_message_is_judged_as_the_same_record_in_a_labels_file(tmp_path: Path) -> None:
    records = [{"txn_id": "a", "is_fraud": True, "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "b", "is_fraud": 0, "label_time": "2024-01-02 03:04:05.123456"},
               {"txn_id": " c ", "is_fraud": "FALSE", "label_time": "2024-01-02T00:00:00-05:00"},
               {"is_fraud": True, "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "d", "is_fraud": "yes", "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "e", "is_fraud": None, "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "f", "is_fraud": 1, "label_time": "2024-13-02T00:00:00Z"},
               {"txn_id": "g", "is_fraud": 1.0, "label_time": 1704153600},
               {"txn_id": CARD, "is_fraud": 1, "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "h" * 300, "is_fraud": 1, "label_time": "2024-01-02T00:00:00Z"},
               {"txn_id": "i\u0000", "is_fraud": 1, "label_time": "2024-01-02T00:00:00Z"}]
    path = tmp_path / "feed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (raw, unreadable), = read_labels_file(path, run_id="r", recorded_at_us=0)
    want_labels, want_dead = parse_labels(raw, source="feed.jsonl", run_id="r", recorded_at_us=0)
    messages = [(i, json.dumps({"schema": "finfeat.label.v1", **r, "source": "feed.jsonl"}).encode())
                for i, r in enumerate(records)]
    labels, dead = decode_labels(messages, source="labels/0", default_source="labels", run_id="r", recorded_at_us=0)
    assert unreadable.num_rows == 0 and want_labels.num_rows == 3 and want_dead.num_rows == 8
    assert labels.equals(want_labels)
    columns = ["reason", "detail", "source_row", "txn_id", "raw_payload"]
    assert dead.select(columns).equals(want_dead.select(columns))
    assert set(dead.column("source").to_pylist()) == {"labels/0"}


# ------------------------------------------------------------------------- failures and stops

def test_a_store_that_fails_exits_4_and_the_batch_is_read_again(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    topic = "store-fails"
    _send(kafka.bootstrap, topic, [(b"t1", _label("t1", True, "2024-01-02T00:00:00Z")),
                                   (b"t2", _label("t2", False, "2024-01-02T00:00:00Z"))])
    spec_path = _spec_file(tmp_path, SMALL)
    with running_redis(tmp_path / "redis") as server:
        store = RedisOnlineStore(server.url, SMALL, namespace="fftest:fails")
        args = _consumer_args(store, spec_path, kafka.bootstrap, topic, "--stop-after-idle", "2")
        server.pause()   # the store stops answering
        try:
            failed = _run(args)
        finally:
            server.resume()
        assert failed.returncode == 4, failed.stderr[-3000:]
        assert "not committed" in failed.stderr and "run it again" in failed.stderr
        assert _committed(kafka.bootstrap, f"finfeat-store-labels-{topic}", topic) == 0
        report = _report(_run(args))
        assert (report["messages_read"], report["labels_accepted"]) == (2, 2)
        assert {t: lab.is_fraud for t, lab in _labels(store, ["t1", "t2"]).items()} == {"t1": True, "t2": False}
        store.close()


def test_sigterm_finishes_the_batch_and_exits_0(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    topic = "sigterm"
    _send(kafka.bootstrap, topic, [(f"t{i}".encode(), _label(f"t{i}", i % 2, "2024-01-02T00:00:00Z"))
                                   for i in range(50)])
    store = open_store(f"sqlite:{tmp_path / 'online.db'}", SMALL)
    args = _consumer_args(store, _spec_file(tmp_path, SMALL), kafka.bootstrap, topic, "--max-batch", "10")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while _committed(kafka.bootstrap, f"finfeat-store-labels-{topic}", topic) < 50:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the consumer did not read the topic within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert (report["messages_read"], report["labels_accepted"], report["stopped_by"]) == (50, 50, "signal")
    assert "SIGTERM received" in err
    assert len(_labels(store, [f"t{i}" for i in range(50)])) == 50
    store.close()


@pytest.mark.parametrize(("flags", "message"), [
    (["--labels", "x.csv", "--topic", "t", "--bootstrap", "h:1"], "pass one of them"),
    (["--topic", "t"], "--topic needs --bootstrap"),
    (["--labels", "x.csv", "--stop-after-idle", "2"], "go with --topic"),
    ([], "nothing to read"),
])
def test_bad_flags_fail_fast(flags: list[str], message: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from finfeat.jobs.cli import main

    assert main(["store-labels", "--store", f"sqlite:{tmp_path / 'none.db'}", *flags]) == 2
    assert message in capsys.readouterr().err
