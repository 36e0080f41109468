"""Point-in-time joins of the user's rows (`training-set --entities`, `get_historical_features`)
against an independent DuckDB query, on the demo data and on generated data with ties."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

import finfeat
from finfeat.jobs.cli import main
from finfeat.jobs.historical import EntityRowsError, historical_features
from tests.oracle import FEATURE_COLUMNS, compare_features
from tests.pit_oracle import oracle_point_in_time
from tests.training_fixtures import sparkov_warehouse  # noqa: F401

pytest.importorskip("duckdb")

_US = 1_000_000
ORACLE_COLUMNS = [c for c in FEATURE_COLUMNS if c != "card_geo_velocity_kmh"]


def _events(warehouse: Path) -> pa.Table:
    return DeltaTable(str(warehouse / "features")).to_pyarrow_table(
        columns=["txn_id", "card_token", "merchant_id", "amount_minor", "event_time"])


def _queries(events: pa.Table, n: int, seed: int) -> pa.Table:
    """Entity rows: at event times exactly (ties), shortly after, days later, before any event, and
    unknown cards; some without merchant or amount; a label column that must come back as is."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, events.num_rows, n)
    rows = events.take(pa.array(picks)).to_pylist()
    t0 = pc.min(events.column("event_time")).as_py()
    shifts = [0, 0, 1, 59 * _US, 3_600 * _US, 86_400 * _US, 9 * 86_400 * _US, -1]
    out: dict[str, list] = {k: [] for k in ("row_id", "card_token", "merchant_id", "amount_minor", "ts", "label")}
    for i, r in enumerate(rows):
        t = _us(r["event_time"])
        kind = i % 10
        shift = shifts[i % len(shifts)]
        ts = t + shift
        card = r["card_token"]
        if kind == 7:
            card = f"tok_unknown_{i}"
        if kind == 8:
            ts = _us(t0) - 3_600 * _US
        other = rows[(i + 3) % len(rows)]
        out["row_id"].append(f"r{i:05d}")
        out["card_token"].append(card)
        out["merchant_id"].append(None if kind == 4 else (r["merchant_id"] if i % 3 else other["merchant_id"]))
        out["amount_minor"].append(None if kind == 5 else int(r["amount_minor"]) + (i % 3) * 1000)
        out["ts"].append(ts)
        out["label"].append(bool(i % 2))
    return pa.table({
        "row_id": pa.array(out["row_id"]), "card_token": pa.array(out["card_token"]),
        "merchant_id": pa.array(out["merchant_id"], pa.string()),
        "amount_minor": pa.array(out["amount_minor"], pa.int64()),
        "ts": pa.array(out["ts"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "label": pa.array(out["label"]),
    })


def _us(dt) -> int:  # noqa: ANN001
    return int(pa.scalar(dt, pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py())


def _check_against_oracle(warehouse: Path, queries: pa.Table) -> pa.Table:
    entities = queries.rename_columns(["row_id", "card_token", "merchant_id", "amount_minor", "timestamp", "label"])
    ours = finfeat.get_historical_features(entities, warehouse=warehouse)
    # the user's columns come back as they are, in order
    assert ours.select(entities.column_names).equals(entities)
    oracle = oracle_point_in_time(_events(warehouse), queries)
    assert oracle.num_rows == queries.num_rows
    ours_cmp = ours.rename_columns(["txn_id" if c == "row_id" else c for c in ours.column_names])
    problems = compare_features(ours_cmp.select(["txn_id", *ORACLE_COLUMNS, "as_of"]),
                                oracle.select(["txn_id", *ORACLE_COLUMNS, "as_of"]), check_types=False)
    assert problems == []
    assert ours.column("card_geo_velocity_kmh").null_count == ours.num_rows
    return ours


def test_card_rows_equal_the_oracle_on_the_demo_data(sparkov_warehouse: Path) -> None:  # noqa: F811
    events = _events(sparkov_warehouse)
    queries = _queries(events, 600, seed=1)
    ours = _check_against_oracle(sparkov_warehouse, queries)
    # the rows are not trivially empty: most have history, unknown cards have none
    counts = ours.column("card_count_30d").to_numpy(zero_copy_only=False)
    assert (counts > 0).sum() > 300
    unknown = pc.starts_with(ours.column("card_token"), "tok_unknown_")
    assert ours.filter(unknown).column("as_of").null_count == pc.sum(unknown).as_py()


@pytest.fixture(scope="module")
def tied_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated events, times floored to 30 minutes on 12 cards and 32 merchants: many
    transactions of one card (and of one merchant) at the same instant, then backfilled."""
    from finfeat.jobs.backfill import BackfillConfig, run_backfill
    from finfeat.jobs.generate import generate
    from finfeat.schemas.mapping import Mapping
    from tests.conftest import RUNNER, TOKEN_KEY

    root = tmp_path_factory.mktemp("ties")
    raw = root / "gen.parquet"
    generate(out=str(raw), events=3000, seed=11, start="2024-01-01", days=12, cards=12, merchants=32,
             fraud_rate=0.01, time_resolution="s", progress=False)
    table = pq.read_table(raw)
    us = table.column("event_time").cast(pa.int64()).to_numpy()
    floored = pa.array((us // (1800 * _US)) * (1800 * _US), pa.int64()).cast(table.schema.field("event_time").type)
    table = table.set_column(table.schema.get_field_index("event_time"), "event_time", floored)
    pq.write_table(table, raw)
    wh = root / "wh"
    run_backfill(BackfillConfig(inputs=[raw], mapping=Mapping.load("generated"), warehouse=wh,
                                start=date(2024, 1, 1), end=date(2024, 1, 31), token_key=TOKEN_KEY,
                                beam_args=[f"--runner={RUNNER}"], buckets=2, feature_suite=None, event_suite=None))
    return wh


def test_card_rows_equal_the_oracle_with_ties(tied_warehouse: Path) -> None:
    events = _events(tied_warehouse)
    per_instant = events.group_by(["card_token", "event_time"]).aggregate([("txn_id", "count")])
    assert per_instant.num_rows < 0.9 * events.num_rows  # many transactions share a card and an instant
    _check_against_oracle(tied_warehouse, _queries(events, 800, seed=2))


def test_txn_rows_are_the_backfill_rows_known_at_their_time(tied_warehouse: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    features = DeltaTable(str(tied_warehouse / "features")).to_pyarrow_table()
    sample = features.take(pa.array(np.arange(0, features.num_rows, 37)))
    t = sample.column("event_time").cast(pa.int64()).to_numpy()
    offsets = np.array([(0, -1, 5 * _US)[i % 3] for i in range(sample.num_rows)], dtype=np.int64)
    ids = sample.column("txn_id").to_pylist()
    ids[-1] = "no-such-txn"
    entities = pa.table({"txn_id": ids, "timestamp": pa.array(t + offsets).cast(pa.timestamp("us", tz="UTC")),
                         "label": pa.array([i % 2 == 0 for i in range(sample.num_rows)])})
    path = tmp_path / "entities.parquet"
    pq.write_table(entities, path)
    out = tmp_path / "joined.parquet"
    assert main(["training-set", "--entities", str(path), "--warehouse", str(tied_warehouse), "--out", str(out)]) == 0
    assert "txn_id rows" in capsys.readouterr().out
    got = pq.read_table(out)
    assert got.select(entities.column_names).equals(entities)
    # independent check in DuckDB: the stored row where event_time <= timestamp, NULL otherwise
    import duckdb

    con = duckdb.connect()
    con.register("f", features)
    con.register("e", entities)
    expected = con.sql("SELECT e.txn_id, " + ", ".join(f"CASE WHEN f.event_time <= e.timestamp THEN f.{c} END AS {c}"
                                                        for c in FEATURE_COLUMNS)
                       + " FROM e LEFT JOIN f ON f.txn_id = e.txn_id").to_arrow_table()
    assert compare_features(got.filter(pc.not_equal(got.column("txn_id"), "no-such-txn")).select(
        ["txn_id", *FEATURE_COLUMNS]), expected.filter(pc.not_equal(expected.column("txn_id"), "no-such-txn")),
        check_types=False) == []
    known = (offsets >= 0)
    known[-1] = False
    assert got.column("card_count_30d").is_valid().to_pylist() == known.tolist()


def test_csv_entities_and_errors(sparkov_warehouse: Path, tmp_path: Path,  # noqa: F811
                                 capsys: pytest.CaptureFixture[str]) -> None:
    events = _events(sparkov_warehouse).slice(0, 5)
    csv = tmp_path / "rows.csv"
    lines = ["card_token,timestamp,is_fraud"] + [
        f"{r['card_token']},{r['event_time'].isoformat()},{i % 2}" for i, r in enumerate(events.to_pylist())]
    csv.write_text("\n".join(lines) + "\n")
    res = historical_features(csv, warehouse=sparkov_warehouse)
    assert res.key == "card_token" and res.rows == 5
    assert {"merchant_count_1h", "card_amount_zscore_30d", "card_geo_velocity_kmh"} <= set(res.null_features)
    assert res.table.column("is_fraud").to_pylist() == [0, 1, 0, 1, 0]
    assert res.table.column("card_count_30d").null_count == 0
    import pandas as pd

    frame = finfeat.get_historical_features(pd.read_csv(csv), warehouse=sparkov_warehouse)
    assert isinstance(frame, pd.DataFrame) and list(frame["card_count_30d"]) == res.table.column(
        "card_count_30d").to_pylist()
    bad = tmp_path / "bad.csv"
    bad.write_text("card_token,when\nabc,2020-01-01\n")
    with pytest.raises(EntityRowsError, match="'timestamp' column"):
        historical_features(bad, warehouse=sparkov_warehouse)
    bad.write_text("who,timestamp\nabc,2020-01-01\n")
    with pytest.raises(EntityRowsError, match="txn_id or a card_token"):
        historical_features(bad, warehouse=sparkov_warehouse)
    assert main(["training-set", "--entities", str(bad), "--warehouse", str(sparkov_warehouse),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "txn_id or a card_token" in capsys.readouterr().err
    assert main(["training-set", "--entities", str(csv), "--warehouse", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "finfeat backfill" in capsys.readouterr().err
