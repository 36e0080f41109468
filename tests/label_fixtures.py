"""The labelled world of the label-aware online tests: generated events, a labels feed, and a
real backfill of both (Delta and a SQLite store); the replay of its events against a store.

Shared by ``tests/test_online_labels.py`` (labels written in between) and
``tests/test_labels_kafka.py`` (labels that came through a Kafka topic).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.jobs.generate import generate
from finfeat.jobs.online import Candidate, lookup
from finfeat.jobs.online.base import EntityState, Label, OnlineStore, Retention
from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, TOKEN_KEY, load_events

DAY = 86_400_000_000
HOUR = 3_600_000_000
V1 = FeatureSpec.default()
SPEC = FeatureSpec.from_dict({"version": 1, "features": [
    *[f.model_dump(exclude_none=True) for f in V1.features],
    {"entity": "merchant", "agg": "fraud_rate", "window": "1d", "delay": "1d"},
    {"entity": "merchant", "agg": "fraud_rate", "window": "7d", "delay": "2d"},
]})
RATES = [f for f in SPEC.features if f.agg == "fraud_rate"]
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
DAYS = 30


def _us(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Generated events (with fraud patterns), a labels feed, and a real backfill of both into
    Delta and a SQLite online store.

    Half of the transactions carry no label on the event: their label comes from the feed, 0-6
    days later (some exactly at another transaction of the same merchant, some exactly one or
    two days after their own, the features' delays), a tenth of them the opposite of the event's
    truth (disputes that went the other way); a tenth of the others have no label at all; the
    feed also has labels of transactions nobody saw.
    """
    root = tmp_path_factory.mktemp("labelled")
    raw_path = root / "events.parquet"
    generate(out=raw_path, events=3_000, seed=11, start=START, days=DAYS, fraud_rate=0.06)
    raw = pq.read_table(raw_path)
    n = raw.num_rows
    rng = np.random.default_rng(5)
    txn = raw.column("txn_id").to_pylist()
    t = raw.column("event_time").cast(pa.int64()).to_numpy()
    merchant = raw.column("merchant_id").to_pylist()
    truth = raw.column("is_fraud").to_pylist()
    from_feed = rng.random(n) < 0.5
    unlabelled = ~from_feed & (rng.random(n) < 0.1)
    later_at: dict[str, list[int]] = {}
    for i in range(n):
        later_at.setdefault(merchant[i], []).append(i)
    feed: dict[str, tuple[bool, int]] = {}
    for i in np.flatnonzero(from_feed):
        fraud = bool(truth[i]) != bool(rng.random() < 0.1)
        kind = rng.random()
        when = int(t[i] + rng.integers(0, 6 * DAY))
        if kind < 0.3:  # exactly when a later transaction of the same merchant happens
            same = [j for j in later_at[merchant[i]] if t[j] > t[i]]
            if same:
                when = int(t[same[int(rng.integers(0, min(len(same), 30)))]])
        elif kind < 0.4:
            when = int(t[i] + (DAY if kind < 0.35 else 2 * DAY))
        feed[txn[i]] = (fraud, when)
    for k in range(20):
        feed[f"unseen-{k}"] = (bool(k % 2), _us(START) + int(rng.integers(0, DAYS * DAY)))
    own = pa.array([None if (from_feed[i] or unlabelled[i]) else truth[i] for i in range(n)], pa.bool_())
    raw = raw.set_column(raw.column_names.index("is_fraud"), "is_fraud", own)
    pq.write_table(raw, raw_path)
    feed_path = root / "chargebacks.csv"
    with feed_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["txn_id", "is_fraud", "label_time"])
        for txn_id, (fraud, when) in feed.items():
            w.writerow([txn_id, "1" if fraud else "0", _iso(when)])

    store_url = f"sqlite:{root / 'online.db'}"
    report = run_backfill(BackfillConfig(
        inputs=[raw_path], labels=[feed_path], mapping=Mapping.load("generated"), warehouse=root / "wh",
        start=START.date(), end=(START + timedelta(days=DAYS)).date(), token_key=TOKEN_KEY, spec=SPEC,
        beam_args=[f"--runner={RUNNER}"], buckets=2, online_store=store_url))
    assert report["status"] == "succeeded"
    assert report["labels_accepted"] == len(feed)
    assert report["online_store"]["labels_written"] > 0
    delta = DeltaTable(str(root / "wh" / "features")).to_pyarrow_table()
    events, dead = load_events(raw_path, "generated")
    assert dead.num_rows == 0
    events = events.drop_columns(["_source", "_source_row"]).select(EVENT_SCHEMA.names)
    events = events.sort_by([("event_time", "ascending"), ("txn_id", "ascending")])
    # the events as the backfill's engine sees them: the feed's label wins, with its time
    ids = events.column("txn_id").to_pylist()
    attached = events.set_column(
        EVENT_SCHEMA.get_field_index("is_fraud"), "is_fraud",
        pa.array([feed[i][0] if i in feed else f for i, f in zip(ids, events.column("is_fraud").to_pylist())],
                 pa.bool_())).append_column(
        "label_time", pa.array([feed[i][1] if i in feed else None for i in ids], pa.int64()).cast(
            pa.timestamp("us", tz="UTC")))
    labels = sorted((Label(i, f, w, "chargebacks.csv") for i, (f, w) in feed.items()),
                    key=lambda lab: (lab.time_us, lab.txn_id))
    return {"events": events, "attached": attached, "delta": delta, "labels": labels,
            "store_url": store_url, "feed_path": feed_path}



def rows_by_txn(table: pa.Table) -> dict[str, dict[str, object]]:
    return {r["txn_id"]: {k: r[k] for k in SPEC.names} for r in table.select(["txn_id", *SPEC.names]).to_pylist()}




def effective(state: EntityState, r: Retention) -> tuple[object, ...]:
    """A state as a lookup sees it: each event with its effective label and label time."""
    at = r.fields.index("is_fraud") if r.labels else -1
    events = []
    for e in state.events:
        lab = state.labels.get(e.txn_id)
        values = list(e.values)
        when = None
        if lab is not None:
            values[at], when = lab.is_fraud, lab.time_us
        events.append((e.time_us, e.txn_id, e.located, tuple(values), when))
    return state.as_of_us, state.pruned_max_us, tuple(sorted(events))


def snapshot(store: OnlineStore) -> dict[tuple[str, str], tuple[object, ...]]:
    return {k: effective(s, store.retention[k[0]]) for k, s in store.snapshot().items()}


def replay_with_lookups(store: OnlineStore, world: dict[str, object], *,
                        labels: Sequence[Label] = ()) -> tuple[int, int, int]:
    """The world's events in event order into ``store``, each looked up just before it is
    written; ``labels`` (in label-time order) written in between, each before the first
    transaction at or after its label time (so labels known exactly at a candidate's time are in
    the store and must not count), the rest at the end. Every lookup must equal its transaction's
    row in the backfill's Delta table, field by field. Returns (rows checked, rows with a
    non-zero fraud rate, labels written)."""
    events: pa.Table = world["events"]
    expected = rows_by_txn(world["delta"])
    rows = events.to_pylist()
    times = events.column("event_time").cast(pa.int64()).to_pylist()
    j = checked = labels_sent = rates_seen = 0
    for k, row in enumerate(rows):
        pending = []
        while j < len(labels) and labels[j].time_us <= times[k]:
            pending.append(labels[j])
            j += 1
        if pending:
            labels_sent += store.write_labels(pending).labels
        cand = Candidate(card_token=row["card_token"], merchant_id=row["merchant_id"],
                         amount_minor=row["amount_minor"], at_us=times[k], currency=row["currency"],
                         merchant_lat=row["merchant_lat"], merchant_lon=row["merchant_lon"], txn_id=row["txn_id"])
        got = lookup(store, SPEC, cand, on_missing="empty").features
        want = expected.get(row["txn_id"])
        if want is not None:  # rows a validation suite quarantined are not in Delta
            diff = {name: (got[name], want[name]) for name in SPEC.names
                    if got[name] != want[name] or type(got[name]) is not type(want[name])}
            assert not diff, f"txn {row['txn_id']} (#{k}): online != batch for {diff}"
            checked += 1
            rates_seen += any(want[f.name] for f in RATES)
        store.write(events.slice(k, 1))
    if j < len(labels):
        labels_sent += store.write_labels(labels[j:]).labels
    assert checked >= 0.99 * len(rows) and rates_seen > 100
    return checked, rates_seen, labels_sent
