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


# ----------------------------------------------------------------------------------- bad files

def _sparkov_lines(n: int, start: int = 0) -> list[str]:
    """``n`` valid Sparkov rows (distinct txn ids) as CSV lines, without the header."""
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    for i in range(start, start + n):
        w.writerow([{**SPARKOV_ROW, "trans_num": f"row-{i}"}[h] for h in SPARKOV_HEADER])
    return out.getvalue().splitlines(keepends=True)


def _header() -> str:
    return ",".join(SPARKOV_HEADER) + "\n"


def _bad_file(kind: str, folder: Path) -> tuple[Path, int, list[str]]:
    """One input file of ``kind``: (path, events expected, dead-letter reasons expected)."""
    import gzip
    import zipfile

    good = _sparkov_lines(6)
    if kind == "invalid_utf8":
        path = folder / "utf8.csv"
        bad = good[3].replace("fraud_", "fraud_\udcff").encode("utf-8", "surrogateescape")
        path.write_bytes((_header() + "".join(good[:3])).encode() + bad + "".join(good[4:]).encode())
        return path, 5, ["unparseable"]
    if kind == "huge_field":
        path = folder / "huge.csv"
        huge = good[2].replace("fraud_", "fraud_" + "x" * (50 << 20), 1)
        path.write_text(_header() + "".join(good[:2]) + huge + "".join(good[3:]))
        return path, 5, ["unparseable"]
    if kind == "duplicate_mapped_column":
        path = folder / "dup_mapped.csv"
        path.write_text(_header().replace(",amt,", ",amt,").rstrip("\n") + ",amt\n"
                        + "".join(line.rstrip("\n") + ",1.00\n" for line in good))
        return path, 0, ["unreadable_file"]
    if kind == "duplicate_unmapped_column":
        path = folder / "dup_unmapped.csv"
        path.write_text(_header().rstrip("\n") + ",first\n" + "".join(line.rstrip("\n") + ",Zelda\n" for line in good))
        return path, 6, []
    if kind == "header_only":
        path = folder / "header_only.csv"
        path.write_text(_header())
        return path, 0, []
    if kind == "empty":
        path = folder / "empty.csv"
        path.write_bytes(b"")
        return path, 0, ["unreadable_file"]
    if kind == "gzip":
        path = folder / "rows.csv.gz"
        path.write_bytes(gzip.compress((_header() + "".join(good)).encode()))
        return path, 6, []
    if kind == "gzip_named_csv":
        path = folder / "really_gzip.csv"
        path.write_bytes(gzip.compress((_header() + "".join(good)).encode()))
        return path, 6, []
    if kind == "truncated_gzip":
        path = folder / "cut.csv.gz"
        blob = gzip.compress((_header() + "".join(_sparkov_lines(2000))).encode())
        path.write_bytes(blob[: len(blob) // 2])
        return path, -1, ["unreadable_file"]  # -1: a prefix of the rows, then the file's dead letter
    if kind == "zip":
        path = folder / "zipped.csv"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("rows.csv", _header() + "".join(good))
        return path, 0, ["unreadable_file"]
    if kind == "not_parquet":
        path = folder / "garbage.parquet"
        path.write_bytes(b"this is not parquet\n" * 10)
        return path, 0, ["unreadable_file"]
    if kind == "jsonl_invalid_utf8":
        path = folder / "lines.jsonl"
        rows = [json.dumps({**GEN_ROW, "txn_id": f"j-{i}"}).encode() for i in range(4)]
        rows[1] = rows[1].replace(b'"m1"', b'"m\xff1"')
        path.write_bytes(b"\n".join(rows) + b"\n")
        return path, 3, ["unparseable"]
    raise AssertionError(kind)


BAD_FILE_KINDS = ["invalid_utf8", "huge_field", "duplicate_mapped_column", "duplicate_unmapped_column", "header_only",
                  "empty", "gzip", "gzip_named_csv", "truncated_gzip", "zip", "not_parquet", "jsonl_invalid_utf8"]


@pytest.mark.parametrize("kind", BAD_FILE_KINDS)
def test_each_bad_file_kind_is_a_dead_letter_or_read(kind: str, tmp_path: Path) -> None:
    """A bad record is a dead letter with its file and line; a bad file is one dead letter that
    names it and says what to do; nothing raises, and every record read is accounted for."""
    path, events_expected, reasons = _bad_file(kind, tmp_path)
    mapping = "generated" if path.suffix in {".jsonl", ".parquet"} else "sparkov"
    from finfeat.jobs.sources import check_columns

    check_columns(path, Mapping.load(mapping))  # never a reason to stop the run
    events, dead = load_events(path, mapping)
    assert sorted(dead.column("reason").to_pylist()) == sorted(reasons)
    assert set(dead.column("source").to_pylist()) <= {path.name}
    if events_expected >= 0:
        assert events.num_rows == events_expected
    else:  # a cut-off file: the records before the cut, then the file's dead letter at the first one missing
        assert 0 < events.num_rows < 2000
        assert dead.column("source_row").to_pylist() == [events.num_rows]
        assert events.column("txn_id").to_pylist() == [f"row-{i}" for i in range(events.num_rows)]
    for detail, reason in zip(dead.column("detail").to_pylist(), dead.column("reason").to_pylist()):
        if reason == "unreadable_file":
            assert path.name in detail
        else:
            assert detail.startswith("line ")
    if kind == "invalid_utf8":
        assert dead.column("source_row").to_pylist() == [3] and dead.column("detail")[0].as_py().startswith("line 5:")
    if kind == "duplicate_mapped_column":
        assert "'amt'" in dead.column("detail")[0].as_py() and "rename" in dead.column("detail")[0].as_py()
    if kind == "zip":
        assert "zip" in dead.column("detail")[0].as_py() and "gzip" in dead.column("detail")[0].as_py()
    if kind == "empty":
        assert "empty" in dead.column("detail")[0].as_py()


def test_folder_listing_skips_hidden_and_unsupported_files(tmp_path: Path) -> None:
    from finfeat.jobs.sources import list_inputs

    (tmp_path / "a.csv").write_text(_header())
    (tmp_path / "b.csv.gz").write_bytes(b"")
    (tmp_path / "._a.csv").write_bytes(b"\x00\x05\x16\x07binary resource fork")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "c.csv.bz2").write_bytes(b"BZh9")
    files, skipped = list_inputs([str(tmp_path)])
    assert [p.name for p in files] == ["a.csv", "b.csv.gz"]
    text = "\n".join(skipped)
    assert "._a.csv: hidden file" in text and ".DS_Store: hidden file" in text
    assert "notes.txt: not a .csv" in text and "c.csv.bz2: bzip2-compressed, not supported" in text


def test_backfill_over_a_folder_of_bad_files_finishes_and_reconciles(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    expected_reasons: list[str] = []
    kinds = [k for k in BAD_FILE_KINDS if k not in {"huge_field", "jsonl_invalid_utf8", "not_parquet"}]
    for i, kind in enumerate(kinds):
        sub = tmp_path / f"k{i}"
        sub.mkdir()
        path, _, reasons = _bad_file(kind, sub)
        # distinct txn ids across files: prefix each file's ids with its kind
        target = folder / f"{i:02d}_{path.name}"
        if kind in {"invalid_utf8", "duplicate_unmapped_column", "header_only"}:
            target.write_bytes(path.read_bytes().replace(b"row-", f"k{i}-".encode()))
        else:
            path.rename(target)
        expected_reasons += reasons
    (folder / "._00.csv").write_bytes(b"\x00\x05\x16\x07")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    from finfeat.jobs.sources import list_inputs

    files, skipped = list_inputs([str(folder)])
    assert len(skipped) == 2
    wh = tmp_path / "wh"
    report = run_backfill(BackfillConfig(
        inputs=files, mapping=Mapping.load("sparkov"), warehouse=wh, start=date(2019, 1, 1), end=date(2019, 1, 31),
        token_key=TOKEN_KEY, beam_args=[f"--runner={RUNNER}"], buckets=2))
    dead = read_table(str(wh / "dead_letters"))
    assert report["rows_read"] == report["events_accepted"] + report["dead_letters"]
    assert report["dead_letters"] == dead.num_rows
    reasons = dead.column("reason").to_pylist()
    assert sorted(r for r in reasons if r != "duplicate_txn_id") == sorted(expected_reasons)
    assert report["dead_letters_by_reason"]["unreadable_file"] == expected_reasons.count("unreadable_file")


@pytest.mark.parametrize("kind", ["jsonl_bad_lines", "csv_bad_rows", "csv_dup_unread", "empty", "zip"])
def test_bad_labels_feeds_are_dead_letters_of_stage_labels(kind: str, tmp_path: Path) -> None:
    """A labels feed is input too: bad records and unreadable files are dead letters of stage
    ``labels`` (so the label reconciliation holds) and nothing raises."""
    from finfeat.jobs.sources import read_labels_file
    from finfeat.transforms.labels import parse_labels

    if kind == "jsonl_bad_lines":
        path = tmp_path / "labels.jsonl"
        path.write_bytes(b'{"txn_id": "a", "is_fraud": 1, "label_time": "2020-01-01T00:00:00Z"}\n{not json\n'
                         b'[1]\n{"txn_id": "b\xff", "is_fraud": 0, "label_time": "2020-01-01T00:00:00Z"}\n'
                         b'{"txn_id": "4000 1234 1234 1234", "is_fraud": 1, "label_time": "2020-01-01T00:00:00Z"}\n')
        want = (1, ["card_number_in_field", "unparseable", "unparseable", "unparseable"])
    elif kind == "csv_bad_rows":
        path = tmp_path / "labels.csv"
        path.write_bytes(b"txn_id,is_fraud,label_time\na,1,2020-01-01T00:00:00Z\nb,1\nc\xff,0,2020-01-01T00:00:00Z\n"
                         b"d,0,2020-01-01T00:00:00Z\n")
        want = (2, ["unparseable", "unparseable"])
    elif kind == "csv_dup_unread":
        path = tmp_path / "labels.csv"
        path.write_text("txn_id,is_fraud,label_time,note,note\na,1,2020-01-01T00:00:00Z,x,y\n")
        want = (1, [])
    elif kind == "empty":
        path = tmp_path / "labels.csv"
        path.write_bytes(b"")
        want = (0, ["unreadable_file"])
    else:
        path = tmp_path / "labels.csv"
        path.write_bytes(b"PK\x03\x04rest")
        want = (0, ["unreadable_file"])
    total_labels, dead_parts, read = 0, [], 0
    for raw, unreadable in read_labels_file(path, run_id="r", recorded_at_us=0):
        labels, dead = parse_labels(raw, source=path.name, run_id="r", recorded_at_us=0)
        total_labels += labels.num_rows
        dead_parts += [dead, unreadable]
        read += raw.num_rows + unreadable.num_rows
    dead = pa.concat_tables(dead_parts)
    assert (total_labels, sorted(dead.column("reason").to_pylist())) == want
    assert set(dead.column("stage").to_pylist()) <= {"labels"}
    assert read == total_labels + dead.num_rows
    assert "4000 1234 1234 1234" not in json.dumps(dead.to_pylist(), default=str)


def test_a_file_without_the_mapped_columns_is_a_bad_file_unless_no_file_fits(tmp_path: Path) -> None:
    from finfeat.jobs.sources import check_inputs
    from finfeat.schemas.mapping import MappingError

    good = tmp_path / "good.csv"
    good.write_text(_header() + "".join(_sparkov_lines(3)))
    other = tmp_path / "other.csv"
    other.write_text("a,b,c\n1,2,3\n")
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 4)
    mapping = Mapping.load("sparkov")
    notes = check_inputs([good, other, junk], mapping)
    assert len(notes) == 2 and "other.csv" in notes[0]
    with pytest.raises(MappingError, match="does not have"):
        check_inputs([other, junk], mapping)  # the mapping fits no file: fail before any work
    events, dead = load_events(other, "sparkov")
    assert events.num_rows == 0 and dead.column("reason").to_pylist() == ["unreadable_file"]
    assert "re-export" in dead.column("detail")[0].as_py()
