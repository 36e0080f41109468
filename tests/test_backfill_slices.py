"""The backfill in event-time slices equals the one-pipeline backfill, on real Delta tables.

Repeated txn ids across slices, malformed rows, a labels feed and a label-aware feature, a range
that starts after the input (history and the unbounded features' tails from earlier slices),
the oracle, bad flags, and a kill -9 between two slices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from finfeat.jobs import testhooks
from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.jobs.delta import read_table
from finfeat.jobs.generate import generate
from finfeat.jobs.slices import Slice, plan_slices
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TRAIN, TOKEN_KEY, load_events
from tests.oracle import compare_features, oracle_features

ARGS = [f"--runner={RUNNER}"]
VOLATILE = {"run_id", "recorded_at", "recorded_date", "quarantined_at", "quarantined_date"}
#: (not events_outside_range: the one pipeline keeps each card's newest event before the history
#: per bucket of its de-duplication, so its count of unused events depends on the bucketing)
COUNTS = ("rows_read", "events_accepted", "dead_letters", "features_written",
          "label_rows_read", "labels_accepted", "label_dead_letters", "labels_written", "dead_letters_by_reason")
DAY_US = 86_400_000_000
#: every kind of feature, with windows of at most 3 days, so that the 20 days of generated events
#: hold history beyond every window (the unbounded features' tails) and a label-aware feature
SPEC = FeatureSpec.from_dict({"features": [
    {"entity": "card", "agg": "count", "window": "1h"}, {"entity": "card", "agg": "count", "window": "3d"},
    {"entity": "card", "agg": "sum", "field": "amount", "window": "24h"},
    {"entity": "card", "agg": "avg", "field": "amount", "window": "3d"},
    {"entity": "card", "agg": "max", "field": "amount", "window": "24h"},
    {"entity": "card", "agg": "std", "field": "amount", "window": "3d"},
    {"entity": "card", "agg": "zscore", "field": "amount", "window": "3d"},
    {"entity": "card", "agg": "distinct", "field": "merchant", "window": "24h"},
    {"entity": "card", "agg": "seconds_since_last"}, {"entity": "card", "agg": "geo_velocity"},
    {"entity": "card", "agg": "is_new", "field": "merchant", "window": "3d"},
    {"entity": "merchant", "agg": "count", "window": "24h"},
    {"entity": "merchant", "agg": "fraud_rate", "window": "2d", "delay": "1d"},
    {"entity": "event", "agg": "hour_of_day"}, {"entity": "event", "agg": "day_of_week"},
]})


def _rows(path: Path) -> list[str]:
    """A table's rows without the per-run columns, as sorted JSON lines."""
    table = read_table(str(path))
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def _check_same(one: tuple[Path, dict], sliced: tuple[Path, dict], *, tables: tuple[str, ...]) -> None:
    (wh1, r1), (wh2, r2) = one, sliced
    assert r1["slices"] == 1 and r2["slices"] > 1
    assert {k: r2.get(k) for k in COUNTS} == {k: r1.get(k) for k in COUNTS}
    assert r2["rows_read"] == r2["events_accepted"] + r2["dead_letters"]
    for table in tables:
        assert _rows(wh2 / table) == _rows(wh1 / table), table
    assert DeltaTable(str(wh2 / "features")).version() == 0  # one commit of the feature rows


# ------------------------------------------------------------------------------ generated input


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """20 days of generated events; a JSON Lines file of later copies of earlier txn ids (some the
    same, some changed), malformed records; a labels feed for some events."""
    root = tmp_path_factory.mktemp("generated")
    main = root / "events.parquet"
    generate(out=main, events=6_000, seed=11, days=20, start="2024-03-01")
    events = pq.read_table(main)
    rows = events.to_pylist()
    extra = []
    for i, r in enumerate(rows[100:2_000:50]):  # copies of early events
        copy = dict(r)
        if i % 2:  # later in time and a different amount: a different slice, the early copy wins
            copy["event_time"] = r["event_time"] + timedelta(days=9, hours=i)
            copy["amount_minor"] = r["amount_minor"] + 1
        extra.append(copy)
    idle = "4000123412341234"  # a card seen on day 1 (located), 12 (not located) and 14 only
    for i, (day, lat) in enumerate([(1, 48.0), (12, None), (14, 49.0)]):
        extra.append({**rows[0], "txn_id": f"idle-{i}", "card_number": idle, "merchant_lat": lat,
                      "merchant_lon": None if lat is None else 2.0,
                      "event_time": datetime(2024, 3, 1 + day, 10, tzinfo=timezone.utc)})
    for r in extra:
        r["event_time"] = r["event_time"].astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [json.dumps(r, default=str) for r in extra]
    lines += ['{"txn_id": "broken', "[1, 2, 3]",
              json.dumps({**json.loads(lines[0]), "txn_id": "bad-amount", "amount_minor": "lots"}),
              json.dumps({**json.loads(lines[0]), "txn_id": "no-time", "event_time": None})]
    more = root / "more.jsonl"
    more.write_text("\n".join(lines) + "\n")
    feed = root / "chargebacks.csv"
    chosen = rows[::37]
    with feed.open("w") as fh:
        fh.write("txn_id,is_fraud,label_time\n")
        for i, r in enumerate(chosen):
            when = r["event_time"] + timedelta(hours=3 + i % 50)
            fh.write(f"{r['txn_id']},{i % 2},{when.astimezone(timezone.utc).isoformat()}\n")
        fh.write(",1,2024-03-05T00:00:00+00:00\n")  # a bad label row
    return {"inputs": [main, more], "labels": [feed], "copies": len(extra) - 3}


def _run_generated(wh: Path, data: dict[str, object], start: date, end: date, **kw: object) -> tuple[Path, dict]:
    report = run_backfill(BackfillConfig(
        inputs=data["inputs"], labels=data["labels"], mapping=Mapping.load("generated"), warehouse=wh,
        start=start, end=end, token_key=TOKEN_KEY, spec=SPEC, beam_args=ARGS, buckets=2, **kw))
    return wh, report


@pytest.mark.parametrize("slicing", [{"slice_days": 3}, {"max_events_per_slice": 2_500}])
def test_slices_equal_one_pipeline_on_generated_data(generated: dict, tmp_path: Path, slicing: dict) -> None:
    start, end = date(2024, 3, 9), date(2024, 3, 18)  # history before the range, events after it
    one = _run_generated(tmp_path / "one", generated, start, end)
    sliced = _run_generated(tmp_path / "sliced", generated, start, end, **slicing)
    _check_same(one, sliced, tables=("features", "dead_letters", "labels"))
    report = sliced[1]
    # every later copy is a dead letter once, whichever slice its day is in; the malformed rows too
    assert report["dead_letters_by_reason"]["duplicate_txn_id"] == generated["copies"]
    assert report["dead_letters"] == generated["copies"] + 4
    assert report["label_dead_letters"] == 1
    assert 0 < report["events_outside_range"] < report["events_accepted"]
    features = read_table(str(sliced[0] / "features"))
    assert pc.max(features.column("merchant_fraud_rate_2d")).as_py() > 0
    idle = {r["txn_id"]: r for r in features.filter(pc.starts_with(features.column("txn_id"), "idle-")).to_pylist()}
    assert idle["idle-1"]["card_seconds_since_last"] == 11 * 86_400  # day 1, from the tail of the first slice
    assert idle["idle-2"]["card_geo_velocity_kmh"] is not None         # day 1 again: the newest located event
    assert features.num_rows == report["features_written"] > 0


def test_plan_keeps_slices_within_the_bound_or_at_least_their_history() -> None:
    counts = {d: 100 for d in range(0, 60)}
    plan = plan_slices(counts, first_day=10, end_day=60, reach_us=7 * DAY_US, max_events=2_000)
    assert plan[0].first_day == 10 and plan[-1].end_day == 60
    assert all(a.end_day == b.first_day for a, b in zip(plan, plan[1:]))
    for sl in plan:
        own = 100 * (sl.end_day - sl.first_day)
        assert own + 700 <= 2_000 or own - 100 < 700  # within the bound, or one day past the history
    assert len(plan) > 1
    # a bound below the history alone: slices as long as their history (work at most doubled)
    tight = plan_slices(counts, first_day=10, end_day=60, reach_us=7 * DAY_US, max_events=500)
    assert all(sl.end_day - sl.first_day == 7 for sl in tight[1:-1])
    assert plan_slices(counts, first_day=0, end_day=10, reach_us=DAY_US, max_events=10, slice_days=4) == [
        Slice(0, 4), Slice(4, 8), Slice(8, 10)]


def test_the_event_count_that_decides_slicing_is_estimated_without_reading_the_input(tmp_path: Path) -> None:
    import gzip

    from finfeat.jobs.slices import estimate_events

    lines = [f"t{i},{'x' * (i % 80)},{i}" for i in range(60_000)]  # about 3 MB, lines of varying length
    text = "txn_id,pad,n\n" + "\n".join(lines) + "\n"
    csv_path, gz_path, pq_path = tmp_path / "a.csv", tmp_path / "a.csv.gz", tmp_path / "a.parquet"
    csv_path.write_text(text)
    gz_path.write_bytes(gzip.compress(text.encode()))
    pq.write_table(pa.table({"n": list(range(12_345))}), pq_path)
    assert estimate_events([pq_path]) == 12_345
    for path in (csv_path, gz_path):
        assert 0.8 * 60_000 < estimate_events([path]) < 1.25 * 60_000, path.name
    assert estimate_events([csv_path, pq_path]) > 60_000


@pytest.mark.parametrize(("field", "value"), [("max_events_per_slice", 0), ("slice_days", 0),
                                              ("max_events_per_slice", 1.5)])
def test_a_bad_slice_size_fails_fast_saying_what_to_give(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match="whole number"):
        BackfillConfig(inputs=[SPARKOV_TRAIN], mapping=Mapping.load("sparkov"), warehouse=tmp_path,
                       start=date(2019, 1, 1), end=date(2019, 1, 2), token_key=TOKEN_KEY, **{field: value})


# ---------------------------------------------------------------------------- public Sparkov data


def _run_sparkov(wh: Path, start: date, end: date, **kw: object) -> tuple[Path, dict]:
    report = run_backfill(BackfillConfig(inputs=[SPARKOV_TRAIN], mapping=Mapping.load("sparkov"), warehouse=wh,
                                         start=start, end=end, token_key=TOKEN_KEY, beam_args=ARGS, buckets=4, **kw))
    return wh, report


def test_slices_equal_one_pipeline_and_the_oracle_on_public_data(tmp_path: Path) -> None:
    start, end = date(2019, 1, 4), date(2019, 1, 13)
    one = _run_sparkov(tmp_path / "one", start, end)
    sliced = _run_sparkov(tmp_path / "sliced", start, end, max_events_per_slice=3_000)
    _check_same(one, sliced, tables=("features", "dead_letters", "labels"))
    ours = read_table(str(sliced[0] / "features")).sort_by("txn_id")
    events, _ = load_events(SPARKOV_TRAIN, "sparkov")
    oracle = oracle_features(events.drop_columns(["_source", "_source_row"]))
    oracle = oracle.filter(pc.is_in(oracle.column("txn_id"), ours.column("txn_id")))
    assert oracle.num_rows == ours.num_rows > 0
    assert compare_features(ours, oracle) == []


def test_slices_quarantine_as_one_pipeline_does(tmp_path: Path) -> None:
    """A feature suite whose drop policy quarantines rows: the same rows land and are quarantined."""
    suite = tmp_path / "capped.yaml"
    suite.write_text("""name: capped
expectations:
  - name: amount_at_most_300_dollars
    policy: drop
    type: expect_column_values_to_be_between
    columns: [amount_minor]
    kwargs: {min_value: 0, max_value: 30000}
""")
    kw = {"feature_suite": str(suite), "max_quarantine_fraction": 0.2}
    one = _run_sparkov(tmp_path / "one", date(2019, 1, 2), date(2019, 1, 12), **kw)
    sliced = _run_sparkov(tmp_path / "sliced", date(2019, 1, 2), date(2019, 1, 12), slice_days=4, **kw)
    _check_same(one, sliced, tables=("features", "dead_letters", "labels", "quarantine/features"))
    assert sliced[1]["validation"]["quarantined"] > 0
    timeless = [{k: v for k, v in r["validation"].items() if k != "seconds"} for r in (one[1], sliced[1])]
    assert timeless[1] == timeless[0]


def test_kill_between_two_slices_leaves_no_table_and_a_rerun_completes(tmp_path: Path) -> None:
    wh = tmp_path / "wh"
    cmd = [sys.executable, "-m", "finfeat.jobs.cli", "backfill", "--input", str(SPARKOV_TRAIN), "--mapping", "sparkov",
           "--start", "2019-01-01", "--end", "2019-01-15", "--warehouse", str(wh), "--buckets", "4",
           "--slice-days", "5", f"--runner={RUNNER}"]
    env = {k: v for k, v in os.environ.items() if k not in (testhooks.KILL_AT_ENV, testhooks.BARRIER_ENV)}
    env["FINFEAT_TOKEN_KEY"] = TOKEN_KEY.decode()
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # the killed run's spill folder stays there
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**env, testhooks.KILL_AT_ENV: "after:slice:2"})
    assert killed.returncode == -9, killed.stderr
    assert not DeltaTable.is_deltatable(str(wh / "features"))
    assert not DeltaTable.is_deltatable(str(wh / "dead_letters"))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr
    clean = _run_sparkov(tmp_path / "clean", date(2019, 1, 1), date(2019, 1, 15))
    assert _rows(wh / "features") == _rows(clean[0] / "features")
    reports = [json.loads(p.read_text()) for p in (wh / "_runs").glob("*.json")]
    assert sorted(r["status"] for r in reports) == ["interrupted", "succeeded"]
    assert DeltaTable(str(wh / "features")).version() == 0


def test_a_sliced_run_materializes_the_same_online_state(tmp_path: Path) -> None:
    from finfeat.jobs.online import open_store
    from finfeat.jobs.online.lookup import Candidate, lookup
    from tests.conftest import SPARKOV_TEST

    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"]).sort_by([("event_time", "ascending")])
    history, nxt = events.slice(0, events.num_rows - 200), events.slice(events.num_rows - 200, 40)
    src = tmp_path / "history.parquet"
    pq.write_table(history, src)
    spec = FeatureSpec.default()
    answers = []
    for name, kw in (("one", {}), ("sliced", {"slice_days": 1})):
        url = f"sqlite:{tmp_path / name}.db"
        report = run_backfill(BackfillConfig(
            inputs=[src], mapping=Mapping.load("canonical"), warehouse=tmp_path / name, start=date(2020, 6, 21),
            end=date(2020, 6, 22), token_key=TOKEN_KEY, beam_args=ARGS, buckets=2, online_store=url, **kw))
        assert report["slices"] == (1 if name == "one" else 2)
        store = open_store(url, spec, create=False)
        try:
            got = []
            for row in nxt.to_pylist():
                t = row["event_time"]
                cand = Candidate(card_token=row["card_token"], merchant_id=row["merchant_id"],
                                 amount_minor=row["amount_minor"], currency=row["currency"],
                                 at_us=int(t.timestamp()) * 1_000_000 + t.microsecond, txn_id=row["txn_id"],
                                 merchant_lat=row["merchant_lat"], merchant_lon=row["merchant_lon"])
                got.append(lookup(store, spec, cand, on_missing="empty").features)
        finally:
            store.close()
        answers.append(got)
    assert answers[1] == answers[0]
    assert sum(1 for a in answers[0] if a["card_count_30d"]) > 10  # the stores hold history
