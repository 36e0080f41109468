"""The online store on SQLite and on a real redis-server (127.0.0.1).

* train/serve consistency: events replayed in event-time order; just before each is written it
  is looked up as a candidate, and the result must equal its row in the Delta table written
  by a real backfill (and compute_features), field by field, for all 5,116 transactions;
* monotonic writes: shuffled, repeated, reversed and concurrent (threads and processes)
  writers end in the state of an in-order write; as-of never moves back;
* missing, expired, unreachable: typed results and errors, never stale or default values;
* Redis down mid-materialization: a clear error, and every state is that of whole batches.

Floats are compared exactly (``==``): the lookup calls the same engine on the same window
values, so equal is the only acceptable answer.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from deltalake import DeltaTable

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.jobs.online import (
    CANDIDATE_TXN_ID,
    Candidate,
    CandidateBeforeState,
    KeyExpired,
    KeyNotFound,
    StoreSpecMismatch,
    StoreUnavailable,
    lookup,
    lookup_many,
    materialize,
    open_store,
    retention_for,
)
from finfeat.jobs.online.base import EntityState, EntityUpdate, OnlineStore, StoredEvent, prune, wall_clock_us
from finfeat.jobs.online.redis_store import RedisOnlineStore
from finfeat.jobs.online.sqlite import SqliteOnlineStore
from finfeat.jobs import serve_lookup
from finfeat.schemas.events import TransactionEvent, events_to_table
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TEST, TOKEN_KEY
from tests.online_fixtures import (  # noqa: F401  (fixtures)
    SHORT_SPEC,
    make_store,
    redis_server,
    running_redis,
    sparkov_test_events,
    with_unlocated,
)

SPEC = FeatureSpec.default()
DAY_US = 86_400_000_000


def _canonical(store: OnlineStore) -> dict[tuple[str, str], tuple[object, ...]]:
    return {k: s.canonical() for k, s in store.snapshot().items()}


def _candidate(row: dict, t_us: int) -> Candidate:
    return Candidate(card_token=row["card_token"], merchant_id=row["merchant_id"], amount_minor=row["amount_minor"],
                     at_us=t_us, currency=row["currency"], merchant_lat=row["merchant_lat"],
                     merchant_lon=row["merchant_lon"], txn_id=row["txn_id"])


def replay_and_compare(store: OnlineStore, spec: FeatureSpec, events: pa.Table,
                       expected: dict[str, dict[str, object]]) -> int:
    """Replay ``events`` in (time, txn_id) order into ``store``; look each up just before it is
    written and compare with ``expected[txn_id]``. Consecutive events that share no card and no
    merchant are looked up together and then written as one batch: none of them can change
    another's state, so this is the same as one lookup and one write at a time."""
    events = events.sort_by([("event_time", "ascending"), ("txn_id", "ascending")])
    rows = events.to_pylist()
    t_us = events.column("event_time").cast(pa.int64()).to_pylist()
    seen: dict[str, set[str]] = {"card": set(), "merchant": set()}
    checked, i, n = 0, 0, len(rows)
    while i < n:
        cards, merchants, j = set(), set(), i
        while j < n and rows[j]["card_token"] not in cards and rows[j]["merchant_id"] not in merchants:
            cards.add(rows[j]["card_token"])
            merchants.add(rows[j]["merchant_id"])
            j += 1
        results = lookup_many(store, spec, [_candidate(rows[k], t_us[k]) for k in range(i, j)], on_missing="empty")
        for k, res in zip(range(i, j), results):
            row = rows[k]
            want = expected[row["txn_id"]]
            got = res.features
            assert list(got) == spec.names
            diff = {name: (got[name], want[name]) for name in spec.names if got[name] != want[name]
                    or type(got[name]) is not type(want[name])}
            assert not diff, f"txn {row['txn_id']} (#{k}): online != batch for {diff}"
            first = {e for e, col in (("card", "card_token"), ("merchant", "merchant_id"))
                     if row[col] not in seen[e]}
            assert set(res.missing) == first, (row["txn_id"], res.missing)
            if "card" not in first:
                assert res.as_of_us is not None and res.as_of_us <= t_us[k]
                assert res.age_s == (t_us[k] - res.as_of_us) / 1e6
            checked += 1
        store.write(events.slice(i, j - i))
        for row in rows[i:j]:
            seen["card"].add(row["card_token"])
            seen["merchant"].add(row["merchant_id"])
        i = j
    return checked


def batch_row(events: pa.Table, spec: FeatureSpec, c: Candidate) -> dict[str, object]:
    """What the backfill computes for the candidate had it been one more event: compute_features
    over the events plus the candidate's row. Only rows of the candidate's card or merchant can
    reach its windows (each entity's features read that entity's rows), so the others are left
    out to keep the test fast."""
    mine = events.filter(pc.or_(pc.equal(events.column("card_token"), c.card_token),
                                pc.equal(events.column("merchant_id"), c.merchant_id)))
    row = events_to_table([TransactionEvent(
        txn_id=c.txn_id, card_token=c.card_token, merchant_id=c.merchant_id, merchant_category=None,
        amount_minor=c.amount_minor, currency="USD", event_time_us=c.at_us, channel="pos",
        merchant_lat=c.merchant_lat, merchant_lon=c.merchant_lon)])
    out = compute_features(pa.concat_tables([mine, row]), spec).slice(mine.num_rows).to_pylist()[0]
    out.pop("txn_id")
    return out


def _by_txn(features: pa.Table, spec: FeatureSpec) -> dict[str, dict[str, object]]:
    cols = features.select(["txn_id", *spec.names]).to_pylist()
    return {r.pop("txn_id"): r for r in cols}


# ---------------------------------------------------------------------------- the backfill side


@pytest.fixture(scope="module")
def delta_features(tmp_path_factory: pytest.TempPathFactory, sparkov_test_events: pa.Table) -> pa.Table:
    """The features table of a real backfill of the public test file (FnApiRunner, Delta)."""
    wh = tmp_path_factory.mktemp("online_wh")
    cfg = BackfillConfig(inputs=[SPARKOV_TEST], mapping=Mapping.load("sparkov"), warehouse=wh,
                         start=date(2020, 6, 21), end=date(2020, 6, 22), token_key=TOKEN_KEY,
                         beam_args=[f"--runner={RUNNER}"], buckets=2)
    report = run_backfill(cfg)
    table = DeltaTable(str(wh / "features")).to_pyarrow_table()
    assert report["features_written"] == table.num_rows
    # rows a validation suite quarantines are not in the table (the policy allows at most 1 %)
    assert table.num_rows >= 0.99 * sparkov_test_events.num_rows
    return table


def test_retention_follows_the_spec() -> None:
    r = retention_for(SPEC)
    assert r["card"].reach_us == 30 * DAY_US and r["merchant"].reach_us == 7 * DAY_US
    assert r["card"].fields == ("merchant_id", "amount_minor", "merchant_lat", "merchant_lon")
    assert r["merchant"].fields == ()
    assert retention_for(SHORT_SPEC)["merchant"].reach_us == 3_600_000_000
    labelled = FeatureSpec.from_dict({"features": [{"entity": "card", "agg": "count", "window": "1h"},
                                                   {"entity": "merchant", "agg": "fraud_rate", "window": "7d"}]})
    # a label-aware kind keeps the events' own labels and reads the feed's (tests/test_online_labels.py)
    merchant = retention_for(labelled)["merchant"]
    assert merchant.labels and merchant.fields == ("is_fraud",) and merchant.reach_us == 14 * DAY_US
    assert not r["merchant"].labels and not r["card"].labels


# ------------------------------------------------------------------ train/serve consistency


def test_online_equals_delta_row_for_every_replayed_transaction(make_store, sparkov_test_events: pa.Table,
                                                                delta_features: pa.Table) -> None:
    """All 5,116 transactions: the lookup just before each is written == its Delta row (and
    == compute_features over all events, for any row a validation suite kept out of Delta)."""
    delta_rows = _by_txn(delta_features, SPEC)
    batch_rows = _by_txn(compute_features(sparkov_test_events, SPEC), SPEC)
    # the backfill wrote what compute_features computes over all events (oracle-tested elsewhere)
    assert all(batch_rows[txn] == row for txn, row in delta_rows.items())
    expected = {**batch_rows, **delta_rows}
    store = make_store(SPEC)
    assert replay_and_compare(store, SPEC, sparkov_test_events, expected) == 5_116
    # and the replayed state is the materialized state
    materialized = make_store(SPEC)
    materialize(materialized, sparkov_test_events, SPEC)
    assert _canonical(store) == _canonical(materialized)


def test_online_equals_batch_with_pruned_state(make_store, sparkov_test_events: pa.Table) -> None:
    """Short windows (minutes to hours) over 31 hours: states prune, the newest and newest
    located events beyond the reach are what seconds_since_last and geo velocity need. The
    first 3,000 transactions (about 17 hours) keep the test fast; pruning starts after 3."""
    events = with_unlocated(sparkov_test_events).slice(0, 3_000)
    expected = _by_txn(compute_features(events, SHORT_SPEC), SHORT_SPEC)
    store = make_store(SHORT_SPEC)
    assert replay_and_compare(store, SHORT_SPEC, events, expected) == 3_000
    states = store.snapshot()
    reach = retention_for(SHORT_SPEC)
    assert sum(s.pruned_max_us is not None for s in states.values()) > 300
    beyond = [s for s in states.values() if s.entity == "card"
              and any(e.time_us <= s.as_of_us - reach["card"].reach_us for e in s.events)]
    assert any(any(e.located for e in s.events if e.time_us <= s.as_of_us - reach["card"].reach_us)
               and not s.events[-1].located for s in beyond), "no located anchor behind an unlocated newest event"


def test_new_candidates_equal_batch_rows(make_store, sparkov_test_events: pa.Table) -> None:
    """Candidates that were never written (default txn id), at times inside and up to 40 days
    after the data: windows slide to ``at``; amount, merchant and location are the candidate's."""
    events = sparkov_test_events
    store = make_store(SPEC)
    materialize(store, events, SPEC)
    rng = np.random.default_rng(17)
    t = events.column("event_time").cast(pa.int64()).to_numpy()
    cards = events.column("card_token").to_pylist()
    merchants = events.column("merchant_id").to_pylist()
    cands = []
    for k in range(120):
        i = int(rng.integers(events.num_rows))
        if k % 4 == 0:
            at = int(t[i])                       # exactly at a stored event of that card: tie broken by txn id
        elif k % 4 == 1:
            at = int(rng.integers(t.min(), t.max()))
        else:
            at = int(t.max()) + int(rng.integers(1, 40 * DAY_US))
        located = bool(rng.random() < 0.7)
        cands.append(Candidate(card_token=cards[i], merchant_id=merchants[int(rng.integers(events.num_rows))],
                               amount_minor=int(rng.integers(0, 200_000)), at_us=at, currency="USD",
                               merchant_lat=float(rng.uniform(25, 48)) if located else None,
                               merchant_lon=float(rng.uniform(-120, -70)) if located else None))
    results = lookup_many(store, SPEC, cands)
    for c, res in zip(cands[:15], results[:15]):
        assert lookup(store, SPEC, c) == res
    assert all(c.txn_id == CANDIDATE_TXN_ID for c in cands)
    for c, res in zip(cands, results):
        assert res.features == batch_row(events, SPEC, c), c


def test_candidate_older_than_pruned_state_is_refused_not_guessed(make_store,
                                                                  sparkov_test_events: pa.Table) -> None:
    events = with_unlocated(sparkov_test_events)
    store = make_store(SHORT_SPEC)
    materialize(store, events, SHORT_SPEC)
    rng = np.random.default_rng(23)
    t = events.column("event_time").cast(pa.int64()).to_numpy()
    rows = events.to_pylist()
    exact = refused = 0
    for _ in range(150):
        r = rows[int(rng.integers(len(rows)))]
        at = int(rng.integers(t.min(), t.max()))
        c = Candidate(card_token=r["card_token"], merchant_id=r["merchant_id"], amount_minor=1234, at_us=at,
                      merchant_lat=40.0, merchant_lon=-75.0)
        try:
            res = lookup(store, SHORT_SPEC, c)
        except CandidateBeforeState as exc:
            assert exc.at_us == at and exc.as_of_us > at
            refused += 1
            continue
        assert res.features == batch_row(events, SHORT_SPEC, c)
        exact += 1
    assert exact > 10 and refused > 10, (exact, refused)


# ------------------------------------------------------------------------- monotonic writes


def _ev(txn: str, card: str, t_us: int, amount: int = 100, *, located: bool = True,
        merchant: str = "m1") -> TransactionEvent:
    return TransactionEvent(txn, card, merchant, None, amount, "USD", t_us, "pos",
                            merchant_lat=40.0 if located else None, merchant_lon=-75.0 if located else None)


def test_older_event_never_overwrites_newer_state(make_store) -> None:
    store = make_store(SPEC)
    t = 1_600_000_000_000_000
    newest = _ev("t4", "c", t)                                   # located
    mid = _ev("t3", "c", t - 40 * DAY_US, located=False)         # beyond the 30-day reach: the anchor
    old = _ev("t2", "c", t - 50 * DAY_US)                        # newest located beyond the reach
    oldest = _ev("t1", "c", t - 60 * DAY_US)                     # dropped
    import itertools

    states = set()
    for n, order in enumerate(itertools.permutations([newest, mid, old, oldest])):
        s = make_store(SPEC, name=f"perm{n}") if n else store
        for e in order:
            s.write([e])
            state = s.read_state("card", "c")
            assert state.as_of_us == max(x.event_time_us for x in order[:order.index(e) + 1])
        s.write([newest._replace(amount_minor=999)])             # same txn id, other content: a no-op
        s.write([oldest, mid])                                   # again: no-op
        states.add(s.read_state("card", "c").canonical())
    assert len(states) == 1
    state = store.read_state("card", "c")
    assert [e.txn_id for e in state.events] == ["t2", "t3", "t4"]
    assert state.as_of_us == t and state.pruned_max_us == t - 60 * DAY_US
    assert state.events[-1].values[1] == 100


def test_times_only_state_reads_ids_and_times_and_answers_ties_and_rescoring(make_store) -> None:
    """A merchant's counts read nothing but ids and times: its state reads as EventTimes (the
    same events as a tuple of StoredEvent, never located even when written so). Candidates at the
    instant of stored events go among them by txn id, and a stored transaction looked up under
    its own id is its batch row: each equals compute_features over the events plus it."""
    store = make_store(SPEC)
    t = 1_600_000_000_000_000
    written = [_ev("m-a", "c1", t, merchant="m"), _ev("m-c", "c2", t, merchant="m"),
               _ev("m-e", "c3", t, merchant="m"), _ev("m-0", "c1", t - 3_600_000_000, merchant="m"),
               _ev("m-9", "c4", t + 5, merchant="m"), _ev("x-1", "c2", t - 60_000_000, merchant="other")]
    store.write(written)
    r = store.retention["merchant"]
    assert r.times_only and not store.retention["card"].times_only
    state = store.read_state("merchant", "m")
    assert [(e.txn_id, e.time_us, e.located, e.values) for e in state.events] == [
        ("m-0", t - 3_600_000_000, False, ()), ("m-a", t, False, ()), ("m-c", t, False, ()),
        ("m-e", t, False, ()), ("m-9", t + 5, False, ())]
    assert state.events == tuple(state.events) and state.events[1:3] == tuple(state.events)[1:3]
    if isinstance(store, SqliteOnlineStore):
        from finfeat.jobs.online.base import EventTimes

        assert isinstance(state.events, EventTimes)
    # an event written as located to a kind that keeps no coordinates is stored unlocated
    store.write_updates([EntityUpdate("merchant", "m", (StoredEvent("m-f", t + 9, True, ()),))])
    assert store.read_state("merchant", "m").events[-1] == StoredEvent("m-f", t + 9, False, ())
    events = events_to_table(written + [_ev("m-f", "c9", t + 9, merchant="m")])
    cands = [Candidate(card_token="c5", merchant_id="m", amount_minor=300, at_us=t, currency="USD", txn_id=txn)
             for txn in ("m-b", "m-d", "m-00", "m-z")]  # between, between, before all, after all at t
    cands.append(Candidate(card_token="c5", merchant_id="m", amount_minor=300, at_us=t, currency="USD"))
    for c, res in zip(cands, lookup_many(store, SPEC, cands, on_missing="empty")):
        assert res.features == batch_row(events, SPEC, c), c.txn_id
    merchant_features = [f.name for f in SPEC.for_entity("merchant")]
    counts = {c.txn_id: lookup(store, SPEC, c, on_missing="empty").features for c in cands}
    assert len({tuple(counts[c.txn_id][n] for n in merchant_features) for c in cands}) > 1  # the ties matter
    # re-scoring stored transactions under their own ids: their own rows
    everything = _by_txn(compute_features(events, SPEC), SPEC)
    for e in written[:5]:
        c = Candidate(card_token=e.card_token, merchant_id=e.merchant_id, amount_minor=e.amount_minor,
                      at_us=e.event_time_us, currency="USD", merchant_lat=e.merchant_lat,
                      merchant_lon=e.merchant_lon, txn_id=e.txn_id)
        assert lookup(store, SPEC, c).features == everything[e.txn_id], e.txn_id


def test_shuffled_repeated_and_reversed_writes_end_in_the_in_order_state(make_store,
                                                                         sparkov_test_events: pa.Table) -> None:
    events = with_unlocated(sparkov_test_events)
    n = events.num_rows
    in_order = make_store(SHORT_SPEC)
    for start in range(0, n, 250):
        in_order.write(events.slice(start, 250))
    expected = _canonical(in_order)
    assert sum(s[1] is not None for s in expected.values()) > 500  # pruning happened

    # the reference rule (base.prune), state by state
    rows = events.to_pylist()
    t_us = events.column("event_time").cast(pa.int64()).to_pylist()
    for kind, col in (("card", "card_token"), ("merchant", "merchant_id")):
        r = in_order.retention[kind]
        grouped: dict[str, list[StoredEvent]] = {}
        for x, t in zip(rows, t_us):
            grouped.setdefault(x[col], []).append(
                StoredEvent(x["txn_id"], t, r.keeps_location and x["merchant_lat"] is not None,
                            tuple(x[f] for f in r.fields)))
        for key, stored in grouped.items():
            asof = max(s.time_us for s in stored)
            ref_kept, ref_pmax = prune(stored, asof, r.reach_us)
            assert expected[(kind, key)] == (asof, ref_pmax, tuple(sorted(ref_kept)))

    rng = np.random.default_rng(11)
    shuffled = make_store(SHORT_SPEC)
    again = rng.permutation(n)[: n // 3]
    order = np.concatenate([rng.permutation(n), again])  # any order; a third of the events twice
    watched = list(expected)[::40]
    last = {k: -1 for k in watched}
    pos = 0
    while pos < len(order):
        size = int(rng.integers(1, 20) if rng.random() < 0.3 else rng.integers(200, 1000))
        shuffled.write(events.take(pa.array(order[pos:pos + size])))
        pos += size
        for k, got in zip(watched, shuffled.read_states(watched)):
            if isinstance(got, EntityState):
                assert got.as_of_us >= last[k], f"as-of of {k} moved back"
                last[k] = got.as_of_us
    assert _canonical(shuffled) == expected

    reversed_store = make_store(SHORT_SPEC)
    for end in range(n, 0, -2000):   # newest first
        reversed_store.write(events.slice(max(0, end - 2000), min(2000, end)))
    assert _canonical(reversed_store) == expected

    materialized = make_store(SHORT_SPEC)
    stats = materialize(materialized, events, SHORT_SPEC, batch_events=500)
    assert stats.states == {"card": 879, "merchant": 689} and stats.batches > 1
    assert _canonical(materialized) == expected


def _write_from_child(backend: str, where: str, namespace: str, events: pa.Table, rows: np.ndarray) -> None:
    try:
        store: OnlineStore
        if backend == "sqlite":
            store = SqliteOnlineStore(where, SHORT_SPEC)
        else:
            store = RedisOnlineStore(where, SHORT_SPEC, namespace=namespace)
        for start in range(0, len(rows), 50):
            store.write(events.take(pa.array(rows[start:start + 50])))
        store.close()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_concurrent_writers_end_in_the_in_order_state(make_store, sparkov_test_events: pa.Table) -> None:
    """Two processes and three threads write the events, each event by two of them, each writer
    in its own shuffled order, in batches of 50."""
    events = with_unlocated(sparkov_test_events)
    reference = make_store(SHORT_SPEC)
    materialize(reference, events, SHORT_SPEC)
    expected = _canonical(reference)

    store = make_store(SHORT_SPEC)
    if isinstance(store, SqliteOnlineStore):
        backend, where, ns = "sqlite", str(store.path), ""
    else:
        backend, where, ns = "redis", store.url, store.namespace
    rng = np.random.default_rng(1)
    writers = 5
    pairs = np.stack([rng.permutation(writers)[:2] for _ in range(events.num_rows)])  # two writers per event
    shares = [rng.permutation(np.flatnonzero((pairs == w).any(axis=1))) for w in range(writers)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_from_child, args=(backend, where, ns, events, shares[w])) for w in (0, 1)]
    for p in procs:
        p.start()
    errors: list[BaseException] = []

    def thread_writer(rows: np.ndarray) -> None:
        try:
            for start in range(0, len(rows), 50):
                store.write(events.take(pa.array(rows[start:start + 50])))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(shares[w],)) for w in (2, 3, 4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    for p in procs:
        p.join(120)
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0, 0]
    assert _canonical(store) == expected


# ------------------------------------------------------------------ missing, expired, unreachable


def test_missing_and_expired_keys_are_typed_never_stale(make_store) -> None:
    store = make_store(SPEC, ttl_s=3600)
    t = 1_600_000_000_000_000
    now = wall_clock_us()
    store.write([_ev("a1", "c-expired", t - DAY_US, merchant="m-expired")], now_us=now - 7_200_000_000)
    store.write([_ev("b1", "c-live", t - DAY_US, merchant="m-live")])

    ok = lookup(store, SPEC, Candidate("c-live", "m-live", 500, t))
    assert ok.features["card_count_24h"] == 0 and ok.features["card_count_7d"] == 1
    assert ok.as_of_us == t - DAY_US and ok.age_s == 86_400.0 and ok.missing == {}

    with pytest.raises(KeyNotFound) as unknown:
        lookup(store, SPEC, Candidate("c-unknown", "m-live", 500, t))
    assert (unknown.value.entity, unknown.value.key, unknown.value.reason) == ("card", "c-unknown", "not_found")
    with pytest.raises(KeyNotFound) as unknown_merchant:
        lookup(store, SPEC, Candidate("c-live", "m-new", 500, t))
    assert unknown_merchant.value.entity == "merchant"

    with pytest.raises(KeyNotFound) as expired:
        lookup(store, SPEC, Candidate("c-expired", "m-live", 500, t))
    assert expired.value.entity == "card"
    if make_store.backend == "sqlite":   # SQLite still has the rows and says why it does not serve them
        assert isinstance(expired.value, KeyExpired) and expired.value.reason == "expired"
    else:                                # Redis has deleted the keys: indistinguishable from never written
        assert expired.value.reason == "not_found"

    flagged = lookup(store, SPEC, Candidate("c-expired", "m-live", 500, t), on_missing="empty")
    assert set(flagged.missing) == {"card"} and flagged.as_of_us is None and flagged.age_s is None
    assert flagged.entity_as_of_us == {"card": None, "merchant": t - DAY_US}
    assert flagged.features["card_count_30d"] == 0 and flagged.features["card_seconds_since_last"] is None
    assert flagged.features["merchant_count_7d"] == 1

    # a write after expiry starts the state afresh: the expired event does not come back
    store.write([_ev("a2", "c-expired", t, merchant="m-expired")])
    state = store.read_state("card", "c-expired")
    assert [e.txn_id for e in state.events] == ["a2"] and state.as_of_us == t

    # a real TTL running out on the store's own clock
    short = make_store(SPEC, ttl_s=1.5)
    written = time.monotonic()
    short.write([_ev("z1", "c-short", t, merchant="m-short")])
    assert short.read_state("card", "c-short").as_of_us == t
    time.sleep(max(0.0, written + 1.7 - time.monotonic()))
    with pytest.raises(KeyNotFound):
        short.read_state("card", "c-short")


def test_unreachable_stores_raise_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no such file"):
        open_store(f"sqlite:{tmp_path / 'absent.db'}", SPEC, create=False)
    with pytest.raises(StoreUnavailable):
        SqliteOnlineStore(tmp_path / "no" / "such" / "dir" / "x.db", SPEC)
    from tests.online_fixtures import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", SPEC)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        lookup(store, SPEC, Candidate("c", "m", 1, 0))
    with pytest.raises(StoreUnavailable):
        store.write([_ev("x", "c", 0)])
    assert time.monotonic() - started < 5


def test_state_of_another_spec_is_refused(make_store, sparkov_test_events: pa.Table) -> None:
    store = make_store(SPEC)
    materialize(store, sparkov_test_events.slice(0, 200), SPEC)
    other = make_store.reopen(store, SHORT_SPEC)
    with pytest.raises(StoreSpecMismatch, match="fresh store"):
        lookup(other, SHORT_SPEC, Candidate("c", "m", 1, 0))
    with pytest.raises(StoreSpecMismatch):
        other.write(sparkov_test_events.slice(0, 1))


def test_materialize_refuses_the_features_table_without_coordinates(make_store,
                                                                    sparkov_test_events: pa.Table) -> None:
    store = make_store(SPEC)
    with pytest.raises(ValueError, match="merchant_lat, merchant_lon .*canonical events"):
        materialize(store, sparkov_test_events.drop_columns(["merchant_lat", "merchant_lon"]), SPEC)
    assert store.snapshot() == {}


# ---------------------------------------------------------------------------- Redis going down


def test_redis_down_mid_materialize_leaves_whole_batches_only(tmp_path: Path, sparkov_test_events: pa.Table) -> None:
    """The server freezes after batch 3: the next batch times out with StoreUnavailable; once it
    wakes up, the state is exactly that of the first 3 or the first 4 batches (a batch is one
    MULTI/EXEC), never part of a batch and never an as-of without its events."""
    events = sparkov_test_events
    refs = []

    class Stop(Exception):
        pass

    for k in (3, 4):
        ref = SqliteOnlineStore(tmp_path / f"ref{k}.db", SPEC)

        def stop_after(stats, k=k):
            if stats.batches == k:
                raise Stop

        with pytest.raises(Stop):
            materialize(ref, events, SPEC, batch_events=400, progress=stop_after)
        refs.append(_canonical(ref))
    assert refs[0] != refs[1]

    with running_redis(tmp_path / "redis") as server:
        store = RedisOnlineStore(server.url, SPEC, socket_timeout_s=0.5)

        def freeze_after_third(stats):
            if stats.batches == 3:
                server.pause()

        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{server.port}.*unavailable"):
            materialize(store, events, SPEC, batch_events=400, progress=freeze_after_third)
        assert time.monotonic() - started < 10
        with pytest.raises(StoreUnavailable):   # still frozen: lookups fail loudly too
            lookup(store, SPEC, Candidate(events.column("card_token")[0].as_py(), "m", 1, 0))
        store.close()
        server.resume()
        fresh = RedisOnlineStore(server.url, SPEC)
        deadline = time.monotonic() + 10   # let the server finish whatever it had received, then look
        while fresh._client.info("clients")["connected_clients"] > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        state = _canonical(fresh)
        assert state in refs
        for (kind, key), (asof, _, kept) in state.items():
            assert asof == max(e.time_us for e in kept)
        # re-running the materialization finishes the job
        materialize(fresh, events, SPEC)
        full = SqliteOnlineStore(tmp_path / "full.db", SPEC)
        materialize(full, events, SPEC)
        assert _canonical(fresh) == _canonical(full)
        fresh.close()


def test_redis_killed_gives_clear_errors_and_cli_exit_4(tmp_path: Path, sparkov_test_events: pa.Table,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    events = sparkov_test_events.slice(0, 500)
    row = events.to_pylist()[-1]
    with running_redis(tmp_path / "redis") as server:
        store = RedisOnlineStore(server.url, SPEC)
        materialize(store, events, SPEC)
        cand = Candidate(row["card_token"], row["merchant_id"], 100, int(row["event_time"].timestamp() * 1e6) + 1)
        assert lookup(store, SPEC, cand).features["card_count_30d"] >= 1
        server.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            lookup(store, SPEC, cand)
        with pytest.raises(StoreUnavailable):
            store.write(events.slice(0, 10))
        with pytest.raises(StoreUnavailable):
            materialize(store, events, SPEC)
        assert time.monotonic() - started < 5
        assert _cli(["--store", server.url, "--card-token", row["card_token"], "--merchant-id", row["merchant_id"],
                     "--amount-minor", "100", "--at", "2020-06-21T12:00:00Z"]) == 4
        out = json.loads(capsys.readouterr().out)
        assert out["error"] == "store_unavailable"


# ------------------------------------------------------------------------------------------ CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finfeat")
    sub = parser.add_subparsers(dest="command")
    serve_lookup.add_parser(sub)
    return serve_lookup.run(parser.parse_args(["serve-lookup", *argv]))


def test_serve_lookup_cli(tmp_path: Path, sparkov_test_events: pa.Table, capsys: pytest.CaptureFixture[str]) -> None:
    events = sparkov_test_events
    path = tmp_path / "online.db"
    with SqliteOnlineStore(path, SPEC) as store:
        materialize(store, events, SPEC)
    row = events.to_pylist()[-1]
    base = ["--store", f"sqlite:{path}", "--card-token", row["card_token"], "--merchant-id", row["merchant_id"],
            "--amount-minor", "4321", "--currency", "USD", "--at", "2020-06-23T08:00:00Z",
            "--lat", "40.5", "--lon", "-74.25"]
    assert _cli(base) == 0
    out = json.loads(capsys.readouterr().out)
    with SqliteOnlineStore(path, SPEC, create=False) as store:
        want = lookup(store, SPEC, Candidate(row["card_token"], row["merchant_id"], 4321,
                                             _iso_us("2020-06-23T08:00:00+00:00"), "USD", 40.5, -74.25))
    assert out["features"] == json.loads(json.dumps(want.features))
    assert out["as_of_us"] == want.as_of_us and out["age_s"] == want.age_s
    assert out["at"] == "2020-06-23T08:00:00Z" and out["missing"] == {}

    assert _cli([*base[:3], "no-such-card", *base[4:]]) == 3
    missing = json.loads(capsys.readouterr().out)
    assert missing["error"] == "not_found" and missing["entity"] == "card"
    assert _cli([*base[:3], "no-such-card", *base[4:], "--allow-missing"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == {"card": "not_found"}
    assert _cli(["--store", f"sqlite:{tmp_path / 'absent.db'}", *base[2:]]) == 4
    assert json.loads(capsys.readouterr().out)["error"] == "store_unavailable"

    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(SHORT_SPEC.model_dump(mode="json")))
    spath = tmp_path / "short.db"
    with SqliteOnlineStore(spath, SHORT_SPEC) as store:
        materialize(store, events, SHORT_SPEC)
        state = next(s for s in store.snapshot().values() if s.entity == "card" and s.pruned_max_us is not None)
    first = events.filter(pc.equal(events.column("card_token"), state.key)).to_pylist()[0]
    assert _cli(["--store", f"sqlite:{spath}", "--feature-spec", str(short), "--card-token", state.key,
                 "--merchant-id", first["merchant_id"], "--amount-minor", "1",
                 "--at", first["event_time"].isoformat()]) == 5
    assert json.loads(capsys.readouterr().out)["error"] == "candidate_before_state"
    assert _cli(["--store", f"sqlite:{spath}", *base[2:]]) == 2  # the store holds another spec's state
    capsys.readouterr()


@pytest.mark.parametrize("change", [
    ["--amount-minor", "1000000000000000000000000"], ["--amount-minor", "1000000000001"], ["--lat", "1000"],
    ["--lon", "-181"], ["--lat", "nan"], ["--lon", "inf"], ["--at", "2300-01-01T00:00:00Z"],
    ["--at", "0001-01-01T00:00:00+05:00"], ["--card-token", "4000123412341234"], ["--currency", "XYZ"],
])
def test_serve_lookup_refuses_out_of_bounds_requests(tmp_path: Path, change: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The bounds every event meets: exit 2 with a message naming the field, no traceback."""
    path = tmp_path / "online.db"
    SqliteOnlineStore(path, SPEC).close()
    args = {"--store": f"sqlite:{path}", "--card-token": "tok_a", "--merchant-id": "m1", "--amount-minor": "1",
            "--currency": "USD", "--at": "2020-06-23T08:00:00Z", "--lat": "40.5", "--lon": "-74.25"}
    args[change[0]] = change[1]
    argv = [x for kv in args.items() for x in kv]
    try:
        code = _cli(argv)
    except SystemExit as exc:  # argparse refusing the value: also exit 2
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" in err


def _iso_us(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000
