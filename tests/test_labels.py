"""Late labels: a labels feed lands in its own Delta table and feeds label-aware features."""
from __future__ import annotations

import csv
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from finfeat.jobs.delta import read_table

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TEST, TOKEN_KEY, load_events
from tests.oracle import oracle_fraud_rate

SPEC = FeatureSpec.from_dict({"features": [
    {"entity": "card", "agg": "count", "window": "24h"},
    {"entity": "merchant", "agg": "fraud_rate", "window": "1d", "delay": "6h"},
]})


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[bool, datetime]]]:
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    rows = events.sort_by("txn_id").to_pylist()
    chosen: dict[str, tuple[bool, datetime]] = {}
    for i, r in enumerate(rows[:600]):
        # chargebacks: some genuine-looking transactions turn out fraudulent, hours later
        chosen[r["txn_id"]] = (i % 3 == 0, r["event_time"] + timedelta(hours=2 + i % 20))
    path = tmp_path_factory.mktemp("feed") / "chargebacks.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["txn_id", "is_fraud", "label_time"])
        for txn, (fraud, when) in chosen.items():
            w.writerow([txn, "1" if fraud else "0", when.isoformat()])
        w.writerow(["", "1", "2020-06-22T00:00:00+00:00"])           # missing txn id
        w.writerow(["abc", "perhaps", "2020-06-22T00:00:00+00:00"])  # not a label
    return path, chosen


def _run(wh: Path, feed_path: Path) -> dict:
    return run_backfill(BackfillConfig(
        inputs=[SPARKOV_TEST], labels=[feed_path], mapping=Mapping.load("sparkov"), warehouse=wh,
        start=date(2020, 6, 21), end=date(2020, 6, 22), token_key=TOKEN_KEY, spec=SPEC,
        beam_args=[f"--runner={RUNNER}"], buckets=2))


def test_labels_table_feed_wins_and_merge_is_idempotent(feed: tuple[Path, dict], tmp_path: Path) -> None:
    path, chosen = feed
    report = _run(tmp_path, path)
    assert report["label_rows_read"] == len(chosen) + 2
    assert report["labels_accepted"] == len(chosen)
    assert report["label_dead_letters"] == 2
    dead = read_table(str(tmp_path / "dead_letters")).to_pylist()
    assert sorted((d["stage"], d["reason"]) for d in dead) == [("labels", "missing_field"), ("labels", "wrong_type")]
    labels = {r["txn_id"]: r for r in read_table(str(tmp_path / "labels")).to_pylist()}
    assert len(labels) == 5_116  # every Sparkov event carries a label
    for txn, (fraud, when) in chosen.items():
        assert labels[txn]["is_fraud"] is fraud and labels[txn]["label_time"] == when.astimezone(timezone.utc)
        assert labels[txn]["source"] != "events"
    other = next(r for t, r in labels.items() if t not in chosen)
    assert other["source"] == "events"
    first = read_table(str(tmp_path / "labels")).sort_by("txn_id")
    _run(tmp_path, path)
    assert read_table(str(tmp_path / "labels")).sort_by("txn_id").equals(first)


def test_fraud_rate_in_delta_uses_the_feed_label_times(feed: tuple[Path, dict], tmp_path: Path) -> None:
    path, chosen = feed
    _run(tmp_path, path)
    features = read_table(str(tmp_path / "features"))
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"])
    # the oracle's input: the feed's label and label time where it has one, else the event's label
    fraud = [chosen[t][0] if t in chosen else f for t, f in zip(events.column("txn_id").to_pylist(),
                                                                events.column("is_fraud").to_pylist())]
    when = [chosen[t][1] if t in chosen else None for t in events.column("txn_id").to_pylist()]
    events = events.set_column(events.column_names.index("is_fraud"), "is_fraud", pa.array(fraud))
    events = events.append_column("label_time", pa.array(when, pa.timestamp("us", tz="UTC")))
    f = SPEC.features[1]
    want = dict(zip(*oracle_fraud_rate(events, window_us=f.window_us, delay_us=f.delay_us).to_pydict().values()))
    got = dict(zip(features.column("txn_id").to_pylist(), features.column(f.name).to_pylist()))
    assert len(got) == len(want) == 5_116
    bad = [(t, got[t], want[t]) for t in want
           if (got[t] is None) != (want[t] is None) or (got[t] is not None and abs(got[t] - want[t]) > 1e-12)]
    assert bad == []
    assert sum(1 for v in got.values() if v) > 0
