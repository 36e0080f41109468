"""Label-aware features online (``merchant_fraud_rate_*``), on SQLite and a real redis-server.

* replay consistency on generated data with a labels feed: transactions in event order, each
  looked up just before it is written, feed labels written in label-time order in between (a
  label with time L before every candidate at t >= L, so labels known exactly at t are in the
  store but must not count); every lookup equals the transaction's row in the Delta table of a
  real backfill with that feed, field by field, and the Delta rows agree with the DuckDB
  oracle; the replayed state equals what the backfill materialized;
* the label rule of the store: the latest label time wins, then the larger source, whatever
  the order of writes; a label may arrive before its transaction; expired labels are not served.

Floats are compared exactly: the lookup runs the batch engine on the same values.
"""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from finfeat.jobs.online import Candidate, lookup, materialize, open_store, retention_for
from finfeat.jobs.online.base import Label, wall_clock_us
from finfeat.schemas.events import TransactionEvent, events_to_table
from finfeat.transforms.spec import FeatureSpec
from tests.label_fixtures import DAY, HOUR, RATES, SPEC, V1, _iso, replay_with_lookups, snapshot, world  # noqa: F401
from tests.online_fixtures import make_store, redis_server  # noqa: F401  (fixtures)
from tests.oracle import compare_features, oracle_features, oracle_fraud_rate


def test_the_backfill_with_a_feed_agrees_with_the_duckdb_oracle(world: dict[str, object]) -> None:
    attached, delta = world["attached"], world["delta"]
    assert delta.num_rows >= 0.99 * attached.num_rows  # a validation suite may quarantine a few rows
    kept = pa.table({"txn_id": delta.column("txn_id")})
    assert compare_features(delta.select(["txn_id", *V1.names]),
                            oracle_features(attached).join(kept, "txn_id", join_type="inner")) == []
    counted = 0
    for f in RATES:
        want = dict(zip(*oracle_fraud_rate(attached, window_us=f.window_us, delay_us=f.delay_us)
                        .to_pydict().values()))
        got = dict(zip(delta.column("txn_id").to_pylist(), delta.column(f.name).to_pylist()))
        bad = [(i, v, want[i]) for i, v in got.items()
               if (v is None) != (want[i] is None) or (v is not None and abs(v - want[i]) > 1e-12)]
        assert bad == [], bad[:5]
        counted += sum(v is not None and v > 0 for v in got.values())
    assert counted > 100, "known fraud must show in the merchant rates"


def test_online_equals_the_backfill_with_labels_arriving_in_between(make_store, world: dict[str, object]) -> None:
    labels: list[Label] = world["labels"]
    store = make_store(SPEC)
    _, _, labels_sent = replay_with_lookups(store, world, labels=labels)
    assert labels_sent == len(labels)
    # the state the stream would leave is the one the backfill materialized (with the feed's labels)
    backfilled = open_store(world["store_url"], SPEC, create=False)
    try:
        assert snapshot(store) == snapshot(backfilled)
    finally:
        backfilled.close()
    pruned = [s for s in store.snapshot().values() if s.entity == "merchant" and s.pruned_max_us is not None]
    assert pruned, "merchant states must have pruned events beyond the label-aware reach"
    # and materialize() of the attached events gives the same state in this backend
    fresh = make_store(SPEC)
    stats = materialize(fresh, world["attached"], SPEC)
    assert stats.labels_written > 0
    assert snapshot(fresh) == snapshot(store)


# ------------------------------------------------------------------------------ the label rule

SMALL = FeatureSpec.from_dict({"features": [
    {"entity": "card", "agg": "count", "window": "1h"},
    {"entity": "merchant", "agg": "fraud_rate", "window": "2d", "delay": "1d"},
]})


def _events(n: int) -> pa.Table:
    return events_to_table([TransactionEvent(f"t{i}", f"c{i % 3}", "m", None, 100, "USD", i * 6 * HOUR, "pos",
                                             is_fraud=(i % 4 == 0)) for i in range(n)])


def test_retention_keeps_labels_for_label_aware_kinds() -> None:
    r = retention_for(SMALL)
    assert r["merchant"].labels and r["merchant"].fields == ("is_fraud",)
    assert r["merchant"].reach_us == 3 * DAY
    assert not r["card"].labels and r["card"].fields == ()


def test_latest_label_wins_whatever_the_order_of_writes(make_store) -> None:
    events = _events(8)   # up to 42 h: nothing pruned (reach 3 days)
    labels = [Label("t1", True, 30 * HOUR, "a.csv"), Label("t1", False, 40 * HOUR, "a.csv"),
              Label("t1", True, 40 * HOUR, "b.csv"),            # same time, larger source: wins
              Label("t2", True, 20 * HOUR, "a.csv"), Label("t2", False, 10 * HOUR, "z.csv"),
              Label("t5", True, 50 * HOUR), Label("t5", False, 50 * HOUR, "a.csv")]  # a named source beats none
    want: dict[tuple[str, str], tuple[object, ...]] | None = None
    for seed in range(4):
        store = make_store(SMALL)
        order = labels[:]
        random.Random(seed).shuffle(order)
        if seed % 2:
            store.write(events)  # events before labels, or after
        for lab in order:
            store.write_labels([lab])
        store.write_labels(order)  # repeated: no change
        if not seed % 2:
            store.write(events)
        state = store.read_state("merchant", "m")
        assert {t: (lab.is_fraud, lab.time_us, lab.source) for t, lab in state.labels.items()} == {
            "t1": (True, 40 * HOUR, "b.csv"), "t2": (True, 20 * HOUR, "a.csv"), "t5": (False, 50 * HOUR, "a.csv")}
        snap = snapshot(store)
        assert want is None or snap == want
        want = snap


def test_a_label_counts_only_once_known_and_from_the_store(make_store) -> None:
    store = make_store(SMALL)
    events = _events(12)   # t0 .. t11 every 6 h; merchant m; t0, t4, t8 fraud on the event
    store.write(events)
    f = SMALL.features[1]
    at = 72 * HOUR

    def rate() -> float:
        return lookup(store, SMALL, Candidate("c0", "m", 100, at)).features[f.name]

    # window (at - 3d, at - 1d] = (0, 48h]: t1 .. t8; event labels count 1 day after their event
    assert rate() == 1 / 8          # t4 (known at 48h); t8 is known at 72h = at, not before it; t0 is out
    store.write_labels([Label("t4", False, at - 1)])
    assert rate() == 0 / 8          # the feed overrides the event's label
    store.write_labels([Label("t2", True, at)])
    assert rate() == 0 / 8          # known exactly at the candidate's time: not before it
    store.write_labels([Label("t2", True, at - 2, "z")])
    assert rate() == 0 / 8          # an older label time does not supersede
    store.write_labels([Label("t3", True, at - 5)])
    assert rate() == 1 / 8
    # the same answer as the engine over the events with these labels attached, by the oracle
    table = events.append_column("label_time", pa.nulls(events.num_rows, pa.timestamp("us", tz="UTC")))
    fraud = [lab if t not in ("t4", "t2", "t3") else t in ("t2", "t3")
             for t, lab in zip(table.column("txn_id").to_pylist(), table.column("is_fraud").to_pylist())]
    times = {"t4": at - 1, "t2": at, "t3": at - 5}
    cand = events_to_table([TransactionEvent("zz", "c0", "m", None, 100, "USD", at, "pos")])
    both = pa.concat_tables([table, cand.append_column("label_time", pa.nulls(1, pa.timestamp("us", tz="UTC")))])
    both = both.set_column(both.column_names.index("is_fraud"), "is_fraud", pa.array(fraud + [None], pa.bool_()))
    both = both.set_column(both.column_names.index("label_time"), "label_time", pa.array(
        [times.get(t) for t in both.column("txn_id").to_pylist()], pa.int64()).cast(pa.timestamp("us", tz="UTC")))
    want = oracle_fraud_rate(both, window_us=f.window_us, delay_us=f.delay_us)
    assert dict(zip(*want.to_pydict().values()))["zz"] == rate()


def test_a_label_before_its_transaction_waits_and_expired_labels_are_not_served(make_store) -> None:
    store = make_store(SMALL, ttl_s=60)
    assert store.label_ttl_us == 3 * DAY   # the label-aware reach, longer than the TTL
    store.write_labels([Label("t0", True, 1)])
    store.write(_events(1))
    assert store.read_state("merchant", "m").labels["t0"].is_fraud is True
    now = wall_clock_us()                  # a label written more than 3 days ago has expired
    stale = make_store(SMALL, ttl_s=60)
    stale.write_labels([Label("t0", True, 1)], now_us=now - 3 * DAY - 10_000_000)
    stale.write(_events(1), now_us=now)
    assert stale.read_state("merchant", "m", now_us=now).labels == {}
    stale.write_labels([Label("t0", False, 0)], now_us=now)   # an older label time, but the stored one expired
    assert stale.read_state("merchant", "m", now_us=now).labels["t0"].is_fraud is False


def test_a_store_without_label_aware_features_keeps_no_labels(make_store) -> None:
    store = make_store(V1)
    assert not store.reads_labels
    assert store.write_labels([Label("t0", True, 1)]).labels == 0
    with pytest.raises(ValueError, match="null is_fraud"):
        make_store(SMALL).write_labels(pa.table({"txn_id": ["a"], "is_fraud": pa.array([None], pa.bool_()),
                                                 "label_time": [1]}))


def test_store_labels_cli_writes_a_feed_with_dead_letters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from finfeat.jobs.cli import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"version": 1, "features": [f.model_dump(exclude_none=True)
                                                                    for f in SMALL.features]}))
    url = f"sqlite:{tmp_path / 'online.db'}"
    store = open_store(url, SMALL)
    store.write(_events(12))
    at = 72 * HOUR
    feed = tmp_path / "chargebacks.csv"
    feed.write_text("txn_id,is_fraud,label_time\n"
                    f"t4,0,{_iso(at - 1)}\n"      # overrides the event's fraud label
                    f"t3,1,{_iso(at - 5)}\n"
                    f"t2,1,{_iso(at)}\n"          # known only at the candidate's time
                    f",1,{_iso(at)}\n"            # no txn id: a dead letter
                    f"t5,maybe,{_iso(at)}\n")     # not a label: a dead letter
    f = SMALL.features[1]
    assert lookup(store, SMALL, Candidate("c0", "m", 100, at)).features[f.name] == 1 / 8
    dead = tmp_path / "dead.jsonl"
    argv = ["store-labels", "--store", url, "--labels", str(feed), "--feature-spec", str(spec_path),
            "--dead-letters", str(dead), "--warehouse", str(tmp_path / "wh")]
    for run in range(2):  # a second run changes nothing
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["label_rows_read"], report["labels_accepted"], report["dead_letters"]) == (5, 3, 2)
        assert report["dead_letters_by_reason"] == {"missing_field": 1, "wrong_type": 1}
        assert len(dead.read_text().splitlines()) == 2
        assert report["dead_letters_new_in_warehouse"] == (2 if run == 0 else 0)
        held = DeltaTable(str(tmp_path / "wh" / "dead_letters")).to_pyarrow_table()
        assert sorted(held.column("source_row").to_pylist()) == [3, 4]
        assert set(held.column("source").to_pylist()) == {"chargebacks.csv"}
        assert lookup(store, SMALL, Candidate("c0", "m", 100, at)).features[f.name] == 1 / 8  # t3 in, t4 out
        assert store.read_state("merchant", "m").labels["t4"].source == "chargebacks.csv"
    store.close()
    assert main(["store-labels", "--store", url, "--labels", str(feed)]) == 2
    assert "no label-aware feature" in capsys.readouterr().err
