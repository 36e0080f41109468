"""Personal data never leaves a raw record except through columns the mapping declares safe,
card numbers are masked wherever text is copied, impossible dates and huge amounts are dead
letters, and window sums cannot wrap (checked against the DuckDB oracle)."""
from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from finfeat.schemas.events import MAX_AMOUNT_MINOR
from finfeat.schemas.mapping import Mapping, MappingError
from finfeat.schemas.redaction import looks_like_card_number, mask_card_numbers
from finfeat.transforms.features import FeatureOverflowError, _ArrayFrame, compute_features
from finfeat.transforms.parse import CardTokenizer, parse_batch
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TRAIN, TOKEN_KEY, load_events, output_bytes
from tests.oracle import compare_features, oracle_features

SPARKOV_MAPPING = Path(__file__).parents[1] / "jobs" / "mappings" / "sparkov.yaml"

with SPARKOV_TRAIN.open(newline="") as _fh:
    _reader = csv.reader(_fh)
    HEADER = next(_reader)
    ROW = dict(zip(HEADER, next(_reader)))

PAN = "4556737586899855"          # Luhn-valid
PAN_SPACED = "4556 7375 8689 9855"
OTHER_PAN = "6011000990139424"
SECRET = {"first": "Quintessa", "last": "Vandermolen", "street": "77 Hiddenmoor Lane", "city": "Obscuraville",
          "zip": "98765", "dob": "1931-07-14", "job": "Cryptozoologist", "lat": "12.3456", "long": "-98.7654"}


def _write(path: Path, rows: list[dict[str, str] | list[str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for r in rows:
            w.writerow(r if isinstance(r, list) else [r[h] for h in HEADER])


def _row(i: int, **change: str) -> dict[str, str]:
    return {**ROW, **SECRET, "trans_num": f"txn-{i}", "cc_num": PAN, **change}


def _all_text(dead: pa.Table) -> str:
    return json.dumps(dead.to_pylist(), default=str)


# ----------------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("column", ["merchant", "trans_num", "category"])
@pytest.mark.parametrize("pan", [PAN, PAN_SPACED, "4556-7375-8689-9855", "371449635398431"])
def test_card_number_in_an_id_column_is_a_dead_letter_and_masked(column: str, pan: str, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    _write(path, [_row(0), _row(1, **{column: pan}), _row(2, **{column: f"fraud_{pan} shop"})])
    events, dead = load_events(path, "sparkov")
    assert events.num_rows == 1
    assert dead.column("reason").to_pylist() == ["card_number_in_field"] * 2
    text = _all_text(dead) + json.dumps(events.to_pylist(), default=str)
    assert pan not in text and pan.replace(" ", "").replace("-", "") not in text
    assert "<card-number>" in text


@pytest.mark.parametrize("column", ["amt", "trans_date_trans_time", "merch_lat", "is_fraud", "state", "city_pop"])
def test_card_number_in_any_other_column_never_reaches_a_dead_letter(column: str, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    _write(path, [_row(0), _row(1, **{column: PAN_SPACED}), _row(2, **{column: f"x {PAN} y"})])
    events, dead = load_events(path, "sparkov")
    text = _all_text(dead) + json.dumps(events.to_pylist(), default=str)
    assert PAN not in text and PAN_SPACED not in text


def test_hex_ids_with_long_digit_runs_are_not_taken_for_cards(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    ids = ["2da90c7d74bd46a0caf3777415b3ebfd", "a1234567890123456b", "tok_ab0123456789012345678cd"]
    _write(path, [_row(i, trans_num=t) for i, t in enumerate(ids)])
    events, dead = load_events(path, "sparkov")
    assert dead.num_rows == 0 and events.column("txn_id").to_pylist() == ids


def test_numeric_ids_opt_out(tmp_path: Path) -> None:
    raw = yaml.safe_load(SPARKOV_MAPPING.read_text())
    raw["fields"]["merchant_id"]["numeric_ids"] = True
    mapping_path = tmp_path / "m.yaml"
    mapping_path.write_text(yaml.safe_dump(raw))
    path = tmp_path / "x.csv"
    _write(path, [_row(0, merchant="123456789012345")])
    events, dead = load_events(path, Mapping.load(mapping_path))
    assert dead.num_rows == 0 and events.column("merchant_id").to_pylist() == ["123456789012345"]


def test_mask_and_detect() -> None:
    assert mask_card_numbers(f"pay {PAN} now, or {PAN_SPACED}") == "pay <card-number> now, or <card-number>"
    assert mask_card_numbers("2020-06-22 10:00:00 epoch 1593561600 amount 12345678901") == \
        "2020-06-22 10:00:00 epoch 1593561600 amount 12345678901"
    assert looks_like_card_number(PAN) and looks_like_card_number(f"m_{PAN}")
    assert not looks_like_card_number(f"a{PAN}b") and not looks_like_card_number("12345678901")


# ----------------------------------------------------------------------------------- item 5


def test_rows_with_the_wrong_field_count_keep_no_value(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    good = _row(0)
    short = [good[h] for h in HEADER if h not in {"category", "gender"}]
    long = [good[h] for h in HEADER] + ["extra", SECRET["dob"]]
    shifted = [good[h] for h in HEADER][1:] + [OTHER_PAN]
    _write(path, [good, short, long, shifted + ["1"]])
    events, dead = load_events(path, "sparkov")
    assert events.num_rows == 1
    assert dead.column("reason").to_pylist() == ["unparseable"] * 3
    text = _all_text(dead)
    for value in [*SECRET.values(), PAN, OTHER_PAN, good["merchant"], good["trans_num"]]:
        assert value not in text, value
    tok = CardTokenizer(TOKEN_KEY)
    assert tok.token(PAN) in text and tok.token(OTHER_PAN) in text  # the card can still be found


def test_payloads_hold_only_mapped_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    _write(path, [_row(0, amt="abc"), _row(1, trans_date_trans_time="yesterday")])
    _, dead = load_events(path, "sparkov")
    mapping = Mapping.load("sparkov")
    for payload in dead.column("raw_payload").to_pylist():
        keys = set(json.loads(payload))
        assert keys <= set(mapping.safe_columns()) | {"card_token"}
        assert "cc_num" not in keys and "lat" in keys  # mapped (card_lat), so declared safe
    text = _all_text(dead)
    for value in [SECRET[k] for k in ("first", "last", "street", "city", "zip", "dob", "job")]:
        assert value not in text


def test_backfill_writes_no_card_number_or_personal_data_anywhere(tmp_path: Path) -> None:
    """The reported cases end to end: card numbers in merchant, txn id, category and an unmapped
    column, rows with too many or too few fields holding dob, zip and home coordinates; every
    byte under the warehouse (Delta logs with column statistics, decoded Parquet, run report)."""
    from datetime import date

    from finfeat.jobs.backfill import BackfillConfig, run_backfill

    path = tmp_path / "in.csv"
    good = _row(0)
    _write(path, [good, _row(1, merchant=PAN), _row(2, trans_num=PAN_SPACED), _row(3, category=f"x_{PAN}"),
                  _row(4, state=OTHER_PAN), [good[h] for h in HEADER][:-2],
                  [good[h] for h in HEADER] + [SECRET["dob"], OTHER_PAN], _row(5)])
    wh = tmp_path / "wh"
    report = run_backfill(BackfillConfig(
        inputs=[path], mapping=Mapping.load("sparkov"), warehouse=wh, start=date(2018, 12, 1), end=date(2020, 12, 31),
        token_key=TOKEN_KEY, beam_args=[f"--runner={RUNNER}"], buckets=2,
        max_dead_letter_fraction=1.0))  # mostly bad rows on purpose
    assert report["rows_read"] == 8 and report["events_accepted"] == 3
    assert report["dead_letters_by_reason"] == {"card_number_in_field": 3, "unparseable": 2}
    blob = output_bytes(wh) + json.dumps(report).encode()
    for secret in [PAN, PAN_SPACED, OTHER_PAN, *SECRET.values()]:
        if secret in (SECRET["lat"], SECRET["long"]):  # mapped (card_lat/lon): written for the good rows
            continue
        assert secret.encode() not in blob, secret
    assert b"<card-number>" in blob


# ----------------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("field", ["merchant_id", "txn_id", "card_lat", "merchant_category"])
def test_a_mapping_that_maps_personal_data_is_refused(field: str, tmp_path: Path) -> None:
    raw = yaml.safe_load(SPARKOV_MAPPING.read_text())
    raw["fields"][field]["column"] = "dob"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MappingError, match=rf"'dob' is listed in pii_columns and mapped onto fields.{field}"):
        Mapping.load(path)


def test_the_card_number_column_may_be_listed_as_personal_data() -> None:
    assert "card_number" in Mapping.load("generated").pii_columns


# ----------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize(("fmt", "text"), [
    ("%Y-%m-%d %H:%M:%S", "2020-06-31 10:00:00"), ("%Y-%m-%d %H:%M:%S", "2021-02-29 00:00:00"),
    ("%Y-%m-%d %H:%M:%S", "2019-04-31 23:59:59"), ("%d/%m/%Y %H:%M", "30/02/2020 12:00"),
    ("%Y-%m-%dT%H:%M:%S%z", "2020-09-31T01:00:00+0200"), ("iso8601", "2021-02-29T00:00:00Z"),
    ("iso8601", "2020-06-31"),
])
def test_impossible_calendar_dates_are_bad_timestamps(fmt: str, text: str) -> None:
    raw = yaml.safe_load(SPARKOV_MAPPING.read_text())
    raw["fields"]["event_time"]["format"] = fmt
    mapping = Mapping.model_validate(raw)
    good = {"%Y-%m-%d %H:%M:%S": "2020-02-29 10:00:00", "%d/%m/%Y %H:%M": "29/02/2020 12:00",
            "%Y-%m-%dT%H:%M:%S%z": "2020-03-01T01:00:00+0200", "iso8601": "2020-02-29T00:00:00Z"}[fmt]
    rows = [_row(0, trans_date_trans_time=good), _row(1, trans_date_trans_time=text)]
    table = pa.table({**{h: [r[h] for r in rows] for h in HEADER if h}, "_source_row": [0, 1]})
    events, dead = parse_batch(table, mapping=mapping, tokenizer=CardTokenizer(TOKEN_KEY), source="x", run_id="r",
                               recorded_at_us=0)
    assert events.column("txn_id").to_pylist() == ["txn-0"]
    assert dead.column("reason").to_pylist() == ["bad_timestamp"]


def test_valid_dates_near_month_ends_are_kept_exactly() -> None:
    texts = ["2020-02-29 00:00:00", "2020-03-01 00:00:00", "2021-03-01 23:59:59", "2020-12-31 23:59:59",
             "2021-01-01 00:00:00", "2020-04-30 12:00:00", "2020-05-01 12:00:00", "2020-5-1 12:00:00"]
    rows = [_row(i, trans_date_trans_time=t) for i, t in enumerate(texts)]
    table = pa.table({**{h: [r[h] for r in rows] for h in HEADER if h}, "_source_row": list(range(len(rows)))})
    events, dead = parse_batch(table, mapping=Mapping.load("sparkov"), tokenizer=CardTokenizer(TOKEN_KEY),
                               source="x", run_id="r", recorded_at_us=0)
    assert dead.num_rows == 0
    want = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc) for t in texts]
    assert events.column("event_time").to_pylist() == want


# ----------------------------------------------------------------------------------- item 8


@pytest.mark.parametrize(("amt", "reason"), [
    ("10000000000.00", None), ("10000000000.01", "amount_out_of_range"), ("999999999999999.99", "amount_out_of_range"),
    ("99999999999999999999999999", "amount_out_of_range"), ("-99999999999999999999", "negative_amount"),
    ("000000000000000000012.50", None), ("1e30", "wrong_type"),
])
def test_amounts_are_bounded_at_parse(amt: str, reason: str | None, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    _write(path, [_row(0, amt=amt)])
    events, dead = load_events(path, "sparkov")
    assert dead.column("reason").to_pylist() == ([reason] if reason else [])
    if reason is None:
        assert 0 < events.column("amount_minor")[0].as_py() <= MAX_AMOUNT_MINOR


@pytest.mark.parametrize("typ", [pa.int64(), pa.uint64(), pa.float64()])
def test_typed_amounts_are_bounded_too(typ: pa.DataType) -> None:
    mapping = Mapping.load("canonical")
    values = [1250, MAX_AMOUNT_MINOR, MAX_AMOUNT_MINOR + 1,
              {"int64": 2**63 - 1, "uint64": 2**64 - 1}.get(str(typ), 1e30)]
    n = len(values)
    table = pa.table({"txn_id": [f"t{i}" for i in range(n)], "card_token": ["tok_a"] * n, "merchant_id": ["m"] * n,
                      "merchant_category": ["c"] * n, "amount_minor": pa.array(values, typ).cast(typ),
                      "currency": ["USD"] * n, "event_time": ["2020-01-01T00:00:00Z"] * n, "channel": ["pos"] * n,
                      "card_lat": [None] * n, "card_lon": [None] * n, "merchant_lat": [None] * n,
                      "merchant_lon": [None] * n, "is_fraud": [None] * n, "_source_row": list(range(n))})
    events, dead = parse_batch(table, mapping=mapping, tokenizer=CardTokenizer(TOKEN_KEY), source="x", run_id="r",
                               recorded_at_us=0)
    assert events.column("amount_minor").to_pylist() == [1250, MAX_AMOUNT_MINOR]
    assert dead.column("reason").to_pylist() == ["amount_out_of_range"] * 2


def test_maximal_amounts_in_one_window_match_the_oracle_exactly() -> None:
    """129 maximal amounts in an hour (the reported case had 120 of 10**17), identical amounts
    (std null), and large mixed amounts (spread wide enough for the oracle's float stddev)."""
    rows = []
    t0 = 1_600_000_000_000_000
    for i in range(130):
        rows.append(("max", MAX_AMOUNT_MINOR, t0 + i * 20_000_000))
    for i in range(40):
        rows.append(("mixed", MAX_AMOUNT_MINOR - (i % 7) * 10**10, t0 + i * 60_000_000))
    n = len(rows)
    events = pa.table({
        "txn_id": [f"t{i:04d}" for i in range(n)], "card_token": [r[0] for r in rows], "merchant_id": ["m1"] * n,
        "amount_minor": pa.array([r[1] for r in rows], pa.int64()),
        "event_time": pa.array([r[2] for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "merchant_lat": pa.nulls(n, pa.float64()), "merchant_lon": pa.nulls(n, pa.float64()),
        "is_fraud": pa.nulls(n, pa.bool_())})
    ours = compute_features(events, FeatureSpec.default())
    assert compare_features(ours, oracle_features(events)) == []
    by_id = {r["txn_id"]: r for r in ours.to_pylist()}
    last = by_id["t0129"]
    assert last["card_sum_amount_1h"] == 129 * MAX_AMOUNT_MINOR
    assert last["card_avg_amount_7d"] == MAX_AMOUNT_MINOR and last["card_std_amount_30d"] is None


def test_a_window_sum_beyond_int64_raises_instead_of_wrapping() -> None:
    group = np.zeros(4, dtype=np.int64)
    t = np.arange(4, dtype=np.int64)
    frame = _ArrayFrame(group, t, {"amount_minor": (np.array([2**62, 2**62, 1, 2**62], dtype=np.int64), None)})
    with pytest.raises(FeatureOverflowError):
        frame.window_sum("amount_minor", 100)
    fits = _ArrayFrame(group, t, {"amount_minor": (np.array([2**61, 2**61, 2**61, 1], dtype=np.int64), None)})
    assert fits.window_sum("amount_minor", 100).tolist() == [0, 2**61, 2**62, 3 * 2**61]
