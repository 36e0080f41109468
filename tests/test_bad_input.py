"""A corpus of broken records in each format reaches dead letters with the right reason."""
from __future__ import annotations

import csv
import json
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from finfeat.jobs.delta import read_table

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.schemas.dead_letters import REASONS
from finfeat.schemas.mapping import Mapping
from tests.conftest import RUNNER, SPARKOV_TRAIN, TOKEN_KEY, load_events

with SPARKOV_TRAIN.open(newline="") as _fh:
    _reader = csv.reader(_fh)
    SPARKOV_HEADER = next(_reader)
    SPARKOV_ROW = dict(zip(SPARKOV_HEADER, next(_reader)))

# (txn id, changes to a valid Sparkov row, expected reason); None = the row stays valid
CSV_CASES: list[tuple[str, dict[str, str], str | None]] = [
    ("ok-1", {}, None),
    ("", {}, "missing_field"),
    ("bad-time", {"trans_date_trans_time": "2019-13-45 25:00:00"}, "bad_timestamp"),
    ("word-amount", {"amt": "abc"}, "wrong_type"),
    ("neg-amount", {"amt": "-5.00"}, "negative_amount"),
    ("nan-amount", {"amt": "NaN"}, "non_finite_amount"),
    ("inf-amount", {"amt": "inf"}, "non_finite_amount"),
    ("sub-cent", {"amt": "1.234"}, "amount_precision"),
    ("bad-card", {"cc_num": "12ab"}, "wrong_type"),
    ("no-merchant", {"merchant": ""}, "missing_field"),
    ("bad-lat", {"merch_lat": "123.0"}, "bad_coordinates"),
    ("word-lat", {"lat": "north"}, "wrong_type"),
    ("bad-label", {"is_fraud": "maybe"}, "wrong_type"),
    ("dup", {"amt": "10.00"}, None),
    ("dup", {"amt": "20.00"}, "duplicate_txn_id"),
]


def _write_csv(path: Path) -> list[str | None]:
    expected: list[str | None] = []
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SPARKOV_HEADER)
        for i, (txn, change, reason) in enumerate(CSV_CASES):
            row = {**SPARKOV_ROW, "trans_num": txn, "first": f"Zelda{i}", "street": f"{i} Secretstreet Rd", **change}
            w.writerow([row[h] for h in SPARKOV_HEADER])
            expected.append(reason)
        # a row with too few fields, holding a card number and a name: unparseable, and redacted
        fh.write("999,2019-01-01 00:00:00,4000123412341234,Zelda99,Secretstreet\n")
        expected.append("unparseable")
    return expected


GEN_ROW = {"txn_id": "g-ok", "card_number": "4000123412341234", "merchant_id": "m1", "merchant_category": "grocery",
           "amount_minor": 1250, "currency": "USD", "event_time": "2024-01-01T10:00:00.000000Z", "channel": "pos",
           "card_lat": 40.0, "card_lon": -73.0, "merchant_lat": 40.1, "merchant_lon": -73.1, "is_fraud": False}
JSONL_CASES: list[tuple[object, str | None]] = [
    ({}, None),
    ({"txn_id": "g-ccy", "currency": "XYZ"}, "unknown_currency"),
    ({"txn_id": "g-frac", "amount_minor": 12.5}, "amount_precision"),
    ({"txn_id": "g-neg", "amount_minor": -3}, "negative_amount"),
    ({"txn_id": "g-time", "event_time": "yesterday"}, "bad_timestamp"),
    ({"txn_id": "g-nomerch", "merchant_id": None}, "missing_field"),
    ({"txn_id": "g-offset", "event_time": "2024-01-01T12:00:00+02:00"}, None),
    ("{not json", "unparseable"),
    ("[1, 2]", "unparseable"),
]


def _write_jsonl(path: Path) -> list[str | None]:
    expected = []
    with path.open("w") as fh:
        for change, reason in JSONL_CASES:
            fh.write((change if isinstance(change, str) else json.dumps({**GEN_ROW, **change})) + "\n")
            expected.append(reason)
    return expected


def _write_parquet(path: Path) -> list[str | None]:
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = [
        ({}, None),
        ({"txn_id": "p-ccy", "currency": "ABC"}, "unknown_currency"),
        ({"txn_id": "p-nan", "amount_minor": float("nan")}, "non_finite_amount"),
        ({"txn_id": "p-neg", "amount_minor": -1.0}, "negative_amount"),
        ({"txn_id": "p-notime", "event_time": None}, "missing_field"),
        ({"txn_id": "p-lon", "merchant_lon": 200.0}, "bad_coordinates"),
        ({"txn_id": "g-ok"}, "duplicate_txn_id"),
    ]
    records = [{**GEN_ROW, "event_time": t0, "amount_minor": 1250.0, **change} for change, _ in rows]
    table = pa.Table.from_pylist(records, schema=pa.schema([
        ("txn_id", pa.string()), ("card_number", pa.string()), ("merchant_id", pa.string()),
        ("merchant_category", pa.string()), ("amount_minor", pa.float64()), ("currency", pa.string()),
        ("event_time", pa.timestamp("us", tz="UTC")), ("channel", pa.string()), ("card_lat", pa.float64()),
        ("card_lon", pa.float64()), ("merchant_lat", pa.float64()), ("merchant_lon", pa.float64()),
        ("is_fraud", pa.bool_())]))
    pq.write_table(table, path)
    return [r for _, r in rows]


def _reasons_by_row(dead: pa.Table) -> dict[int, str]:
    return dict(zip(dead.column("source_row").to_pylist(), dead.column("reason").to_pylist()))


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_each_broken_record_gets_its_reason_and_nothing_is_lost(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"broken.{kind}"
    expected = {"csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet}[kind](path)
    mapping = "sparkov" if kind == "csv" else "generated"
    events, dead = load_events(path, mapping)
    got = _reasons_by_row(dead)
    want = {i: r for i, r in enumerate(expected) if r is not None and r != "duplicate_txn_id"}
    assert got == want
    assert set(got.values()) <= set(REASONS)
    dups = sum(r == "duplicate_txn_id" for r in expected)
    assert events.num_rows + dead.num_rows == len(expected)  # reconciles before dedup
    assert events.num_rows == sum(r in (None, "duplicate_txn_id") for r in expected)
    assert dups in (0, 1)
    assert all(d for d in dead.column("detail").to_pylist())


def test_unparseable_rows_are_redacted(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    _write_csv(path)
    _, dead = load_events(path, "sparkov")
    text = json.dumps(dead.to_pylist(), default=str)
    assert "4000123412341234" not in text
    assert "Zelda" not in text and "Secretstreet" not in text
    assert "tok_" in text


def test_end_to_end_dead_letters_land_in_delta_and_reconcile(tmp_path: Path) -> None:
    for kind, mapping, writer in (("csv", "sparkov", _write_csv), ("jsonl", "generated", _write_jsonl),
                                  ("parquet", "generated", _write_parquet)):
        src = tmp_path / f"broken.{kind}"
        expected = writer(src)
        wh = tmp_path / f"wh_{kind}"
        report = run_backfill(BackfillConfig(
            inputs=[src], mapping=Mapping.load(mapping), warehouse=wh, start=date(2019, 1, 1), end=date(2024, 12, 31),
            token_key=TOKEN_KEY, beam_args=[f"--runner={RUNNER}"], buckets=2,
            max_dead_letter_fraction=1.0))  # most of these files are broken on purpose
        dead = read_table(str(wh / "dead_letters"))
        features = read_table(str(wh / "features"))
        assert report["rows_read"] == len(expected)
        assert report["rows_read"] == features.num_rows + dead.num_rows, kind
        assert sorted(dead.column("reason").to_pylist()) == sorted(r for r in expected if r), kind
        assert report["dead_letters_by_reason"] == {
            r: sum(x == r for x in expected) for r in {x for x in expected if x}}
        blob = b"".join(p.read_bytes() for p in wh.rglob("*") if p.is_file())
        assert b"4000123412341234" not in blob and b"Secretstreet" not in blob and b"Zelda" not in blob
