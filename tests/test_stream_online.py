"""``finfeat stream --online-store``: a real Kafka broker, the job on Prism, SQLite and Redis.

* the store a stream run leaves (events published shuffled within the bound, a repeated txn
  id, a repeated txn id with other content, a late event still within the windows' reach) equals the
  store that materializing the same events in batch gives, state by state, and lookups of
  candidates against both give the same feature rows; the Delta rows equal the batch rows;
* a store that goes away mid-stream fails the job (non-zero exit, the store named in its log).

The spec has windows of minutes to hours, so over the ~6 hours of events the states prune and
keep their anchors. Skipped when Kafka's jars, Prism or redis-server are missing, unless CI is
set (then they fail).
"""
from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from finfeat.jobs.delta import read_table
from finfeat.jobs.online import Candidate, lookup_many, materialize
from finfeat.jobs.online.base import EntityState, OnlineStore
from finfeat.jobs.online.redis_store import RedisOnlineStore
from finfeat.jobs.online.sqlite import SqliteOnlineStore
from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from tests.online_fixtures import SHORT_SPEC, redis_server, running_redis  # noqa: F401 (a fixture)
from tests.oracle import compare_features
from tests.stream_fixtures import (
    BOUND_S,
    commits,
    kill_group,
    require_stream_stack,
    sparkov_events,
    start_stream,
    tail,
    wait_for,
    wait_until,
)

SPEC = SHORT_SPEC
REDIS_DB = 7  # the stream writes the default namespace: a database of its own on the shared server


@pytest.fixture(scope="module")
def kafka():  # noqa: ANN201
    require_stream_stack()
    from finfeat.jobs.kafka.broker import LocalKafka

    with LocalKafka() as broker:
        yield broker


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "features": [f.model_dump(exclude_none=True)
                                                               for f in SPEC.features]}))
    return path


def _produce(events: pa.Table, bootstrap: str, topic: str, **kwargs: object) -> None:
    from finfeat.jobs.produce import produce

    assert produce(events, bootstrap=bootstrap, topic=topic, **kwargs) == events.num_rows


def _send(bootstrap: str, topic: str, events: pa.Table) -> None:
    from confluent_kafka import Producer

    from finfeat.jobs.kafka.messages import encode_events

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, value in encode_events(events):
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _with(table: pa.Table, column: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type)).cast(table.schema)


def _canonical(store: OnlineStore) -> dict:
    return {k: s.canonical() for k, s in store.snapshot().items()}


def _candidates(events: pa.Table) -> list[Candidate]:
    """Next transactions of cards and merchants seen, after the last event (some a few minutes,
    some hours later, when parts of the windows have emptied), half of them located."""
    end = int(events.column("event_time").cast(pa.int64()).to_numpy().max())
    cards = events.column("card_token").to_pylist()
    merchants = events.column("merchant_id").to_pylist()
    out = []
    for i in range(0, events.num_rows, 37):
        j = (i * 7 + 3) % events.num_rows
        located = i % 2 == 0
        out.append(Candidate(cards[i], merchants[j], 1_000 + i, end + (i % 5) * 1_800_000_000 + 60_000_000, "USD",
                             40.7 if located else None, -74.0 if located else None))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_stream_store_equals_batch_materialization(kafka, tmp_path: Path, backend: str,  # noqa: ANN001
                                                   request: pytest.FixtureRequest) -> None:
    events = sparkov_events(1000)
    if backend == "sqlite":
        url = f"sqlite:{tmp_path / 'online.db'}"
        reference: OnlineStore = SqliteOnlineStore(tmp_path / "batch.db", SPEC)
    else:
        server = request.getfixturevalue("redis_server")
        url = f"redis://127.0.0.1:{server.port}/{REDIS_DB}"
        reference = RedisOnlineStore(url, SPEC, namespace=f"fftest:batch-{uuid.uuid4().hex[:8]}")
    topic = f"online-{backend}"
    _produce(events, kafka.bootstrap, topic, disorder_us=BOUND_S * 1_000_000, seed=13)
    wh, log = tmp_path / "wh", tmp_path / "stream.log"
    # a long enough idle stop to send the second round once the first features are committed
    proc = start_stream(kafka.bootstrap, topic, wh, log, idle_s=12,
                        extra=("--feature-spec", str(_spec_file(tmp_path)), "--online-store", url))
    streamed: OnlineStore | None = None
    # the late event: ten minutes before an early event whose card's newest event is less than two
    # hours later; once that early event's features are out it is behind the emitted horizon
    # (late for the features), but within the windows' reach of its card: the state must hold it
    times, cards = events.column("event_time").to_pylist(), events.column("card_token").to_pylist()
    newest = {c: t for c, t in zip(cards, times)}
    early = next(i for i in range(events.num_rows) if newest[cards[i]] - times[i] < timedelta(hours=2))
    marker = events.column("txn_id")[early].as_py()
    try:
        wait_until(lambda: commits(wh / "features") and marker in set(
            read_table(wh / "features").column("txn_id").to_pylist()), 90, "a first features commit", proc, log)
        # the same event again; the same txn id with another amount (the first delivery wins); the late event
        again = events.slice(5, 1)
        changed = _with(events.slice(7, 1), "amount_minor", [123_456])
        late = _with(_with(events.slice(early, 1), "txn_id", ["late-txn-1"]), "event_time",
                     [times[early] - timedelta(minutes=10)])
        _send(kafka.bootstrap, topic, pa.concat_tables([again, changed, late]))
        assert wait_for(proc, log, 120) == 0, tail(log)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    try:
        dead = read_table(wh / "dead_letters")
        got = sorted(zip(dead.column("reason").to_pylist(), dead.column("txn_id").to_pylist()))
        assert got == sorted([("duplicate_txn_id", events.column("txn_id")[5].as_py()),
                              ("duplicate_txn_id", events.column("txn_id")[7].as_py()),
                              ("late", "late-txn-1")]), got
        rows = read_table(wh / "features")
        assert rows.num_rows == events.num_rows
        assert compare_features(rows.select(["txn_id", *SPEC.names]), compute_features(events, SPEC)) == []

        written = pa.concat_tables([events, late]).select(EVENT_SCHEMA.names)
        materialize(reference, written, SPEC)
        streamed = (SqliteOnlineStore(url[len("sqlite:"):], SPEC, create=False) if backend == "sqlite"
                    else RedisOnlineStore(url, SPEC))
        want, have = _canonical(reference), _canonical(streamed)
        assert len(want) == len(set(events.column("card_token").to_pylist())) + len(
            set(events.column("merchant_id").to_pylist()))
        assert set(have) == set(want), sorted(set(have) ^ set(want))[:5]
        different = [k for k in want if have[k] != want[k]]
        assert different == [], f"{len(different)} states differ, e.g. {different[:3]}"
        assert any(s[1] is not None for s in want.values()), "nothing was pruned: the test lost its point"
        late_card = ("card", late.column("card_token")[0].as_py())
        assert "late-txn-1" in {e.txn_id for e in want[late_card][2]}, "the late event is out of reach"

        candidates = _candidates(events)
        ours, theirs = lookup_many(streamed, SPEC, candidates), lookup_many(reference, SPEC, candidates)
        assert [(r.features, r.as_of_us, r.entity_as_of_us) for r in ours] == \
               [(r.features, r.as_of_us, r.entity_as_of_us) for r in theirs]
    finally:
        for store in (streamed, reference):
            if store is None:
                continue
            if isinstance(store, RedisOnlineStore):
                store.drop_namespace()
            store.close()


def test_store_failure_fails_the_stream(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    """The store goes away mid-stream: the job must stop with an error, not drop the writes."""
    events = sparkov_events(400)
    topic = "online-failure"
    _produce(events.slice(0, 200), kafka.bootstrap, topic)
    wh, log = tmp_path / "wh", tmp_path / "stream.log"
    with running_redis(tmp_path / "redis") as server:
        proc = start_stream(kafka.bootstrap, topic, wh, log, idle_s=12,
                            extra=("--online-store", server.url, "--store-retry-seconds", "3"))
        try:
            probe = RedisOnlineStore(server.url, FeatureSpec.default())
            card = events.column("card_token")[0].as_py()

            def written() -> bool:
                return isinstance(probe.read_states([("card", card)])[0], EntityState)

            wait_until(written, 90, "the first online-store write", proc, log)
            probe.close()
            server.kill()
            _send(kafka.bootstrap, topic, events.slice(200))
            rc = wait_for(proc, log, 120)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    assert rc != 0, f"the job exited 0 although the online store was gone; its log:\n{tail(log)}"
    text = log.read_text(errors="replace")
    assert "online store" in text and "unavailable" in text, tail(log)


def test_a_stalled_store_is_ridden_out(kafka, tmp_path: Path) -> None:  # noqa: ANN001
    """The store stops answering for longer than its socket timeout, then answers again: the job
    retries the writes it could not make (idempotent), loses none, and finishes with exit 0."""
    events = sparkov_events(400)
    topic = "online-stall"
    _produce(events.slice(0, 200), kafka.bootstrap, topic)
    wh, log = tmp_path / "wh", tmp_path / "stream.log"
    with running_redis(tmp_path / "redis") as server:
        probe = RedisOnlineStore(server.url, FeatureSpec.default())
        try:
            proc = start_stream(kafka.bootstrap, topic, wh, log, idle_s=12,
                                extra=("--online-store", server.url, "--store-retry-seconds", "120"))
            try:
                first = events.column("card_token")[0].as_py()
                wait_until(lambda: isinstance(probe.read_states([("card", first)])[0], EntityState), 90,
                           "the first online-store write", proc, log)
                server.pause()  # SIGSTOP: connections stay open, nothing answers
                try:
                    _send(kafka.bootstrap, topic, events.slice(200))
                    wait_until(lambda: "retrying" in log.read_text(errors="replace"), 90,
                               "a retried online-store write", proc, log)
                finally:
                    server.resume()
                rc = wait_for(proc, log, 180)
            finally:
                if proc.poll() is None:
                    kill_group(proc)
            assert rc == 0, tail(log)
            reference = SqliteOnlineStore(tmp_path / "reference.db", FeatureSpec.default())
            try:
                materialize(reference, events.select(EVENT_SCHEMA.names), FeatureSpec.default())
                want, have = _canonical(reference), _canonical(probe)
            finally:
                reference.close()
            assert set(have) == set(want), sorted(set(have) ^ set(want))[:5]
            assert [k for k in want if have[k] != want[k]] == [], "writes were lost or changed during the stall"
        finally:
            probe.close()


def test_unusable_store_fails_before_the_job_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable server or a store written for another spec stop ``finfeat stream`` at
    once (exit 4, nothing read from Kafka: the broker address is not even valid here)."""
    from finfeat.jobs.cli import main
    from tests.online_fixtures import free_port

    base = ["stream", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--warehouse", str(tmp_path / "wh")]
    assert main([*base, "--online-store", f"redis://127.0.0.1:{free_port()}/0"]) == 4
    assert "is unavailable" in capsys.readouterr().err
    other = SqliteOnlineStore(tmp_path / "short.db", SPEC)  # state for the short spec
    materialize(other, sparkov_events(50).select(EVENT_SCHEMA.names), SPEC)
    other.close()
    assert main([*base, "--online-store", f"sqlite:{tmp_path / 'short.db'}"]) == 4  # the job's spec is the default
    assert "materialize into a fresh store" in capsys.readouterr().err
    assert not (tmp_path / "wh").exists()
