"""File sources: CSV, JSON Lines and Parquet read as Arrow batches of source columns.

Each reader yields ``(raw_batch, unreadable)`` pairs: ``raw_batch`` holds the source
columns plus ``_source_row`` (the record's 0-based number in its file); ``unreadable`` holds
dead letters for records that could not be read at all (a CSV row with the wrong number of
fields, a line that is not a JSON object). Nothing is dropped silently.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from finfeat.schemas.mapping import Mapping, MappingError
from finfeat.transforms.parse import SOURCE, SOURCE_ROW, CardTokenizer, make_dead_letters, parse_batch

_LOG = logging.getLogger(__name__)

_PAN_RE = re.compile(r"(?<![0-9])[0-9][0-9 \-]{8,22}[0-9](?![0-9])")


def redact_text(text: str, tokenizer: CardTokenizer, pii_keys: set[str]) -> str:
    """Best-effort redaction of an unreadable record: card numbers and JSON PII values."""
    def tokenize(m: re.Match[str]) -> str:
        digits = re.sub(r"[ \-]", "", m.group(0))
        return tokenizer.token(digits) if 10 <= len(digits) <= 19 else m.group(0)

    text = _PAN_RE.sub(tokenize, text)
    for key in pii_keys:
        text = re.sub(rf'("{re.escape(key)}"\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}}\s]+)', r'\1"<redacted>"', text)
    return text[:4000]


_SAFE_FIELD = re.compile(r"^[0-9.:+\-TZ ]*$|^[0-9a-f]{16,64}$")


def redact_misaligned(fields: list[str], delimiter: str, tokenizer: CardTokenizer) -> str:
    """A CSV row whose fields do not line up with the header: no column can be trusted to be
    free of personal data, so only numbers, times and hex ids are kept (card numbers tokenized)."""
    shown = []
    for v in fields:
        digits = re.sub(r"[ \-]", "", v)
        if digits.isdigit() and 10 <= len(digits) <= 19:
            shown.append(tokenizer.token(digits))
        elif _SAFE_FIELD.match(v):
            shown.append(v)
        else:
            shown.append("<redacted>")
    return delimiter.join(shown)[:4000]


def _unreadable(rows: list[tuple[int, str, str]], source: str, run_id: str, recorded_at_us: int) -> pa.Table:
    return make_dead_letters(
        run_id=run_id, stage="read", reasons=["unparseable"] * len(rows), details=[r[1] for r in rows],
        source=source, source_rows=[r[0] for r in rows], txn_ids=[None] * len(rows),
        payloads=[r[2] for r in rows], recorded_at_us=recorded_at_us,
    )


def _strings_table(columns: list[str], rows: list[list[str | None]], ordinals: list[int]) -> pa.Table:
    arrays = [pa.array([r[i] for r in rows], pa.string()) for i in range(len(columns))]
    return pa.Table.from_arrays([*arrays, pa.array(ordinals, pa.int64())], names=[*columns, SOURCE_ROW])


def _csv_header(path: Path, mapping: Mapping) -> list[str] | None:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh, delimiter=mapping.csv.delimiter, quotechar=mapping.csv.quotechar), None)
    if header is None:
        return None
    header = [h.strip() for h in header]
    if header and header[0] == "":
        header[0] = "_index"  # pandas-style unnamed index column
    return header


def _read_csv_fast(path: Path, mapping: Mapping, header: list[str], batch_size: int,
                   skipped: list[int]) -> Iterator[pa.Table]:
    """Arrow's CSV reader; stops (appending the ordinal reached to ``skipped``) at the first bad row."""
    problems: list[str] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        problems.append(row.text)
        return "skip"

    reader = pcsv.open_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=1 << 24),
        parse_options=pcsv.ParseOptions(delimiter=mapping.csv.delimiter, quote_char=mapping.csv.quotechar,
                                        newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                            strings_can_be_null=False, quoted_strings_can_be_null=False),
    )
    done = 0
    for batch in reader:
        if problems:
            skipped.append(done)
            return
        table = pa.Table.from_batches([batch])
        table = table.append_column(SOURCE_ROW, pa.array(range(done, done + table.num_rows), pa.int64()))
        done += table.num_rows
        yield from (table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size))
    if problems:
        skipped.append(done)


def read_csv(path: Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str, recorded_at_us: int,
             batch_size: int = 250_000) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Arrow's fast reader while every row is well formed; from the first malformed row on, the
    csv module, which knows each record's number and line, so every dead letter points home."""
    source = path.name
    header = _csv_header(path, mapping)
    if header is None:
        return
    resume_at: list[int] = []
    no_dead = _unreadable([], source, run_id, recorded_at_us)
    for table in _read_csv_fast(path, mapping, header, batch_size, resume_at):
        yield table, no_dead
    if not resume_at:
        return
    start = resume_at[0]
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=mapping.csv.delimiter, quotechar=mapping.csv.quotechar)
        next(reader, None)
        rows: list[list[str | None]] = []
        ordinals: list[int] = []
        bad: list[tuple[int, str, str]] = []
        ordinal = -1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                ordinal += 1
                bad.append((ordinal, f"line {reader.line_num}: {exc}", "<unreadable>"))
                continue
            ordinal += 1
            if ordinal < start:
                continue
            if len(record) != len(header):
                payload = redact_misaligned(record, mapping.csv.delimiter, tokenizer)
                bad.append((ordinal, f"line {reader.line_num}: {len(record)} fields, the header has {len(header)}",
                            payload))
                continue
            rows.append(record)
            ordinals.append(ordinal)
            if len(rows) >= batch_size:
                yield _strings_table(header, rows, ordinals), _unreadable(bad, source, run_id, recorded_at_us)
                rows, ordinals, bad = [], [], []
        if rows or bad:
            yield _strings_table(header, rows, ordinals), _unreadable(bad, source, run_id, recorded_at_us)


def _json_value(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def read_jsonl(path: Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str, recorded_at_us: int,
               batch_size: int = 100_000) -> Iterator[tuple[pa.Table, pa.Table]]:
    source = path.name
    hidden = mapping.redacted_columns()
    wanted = mapping.source_columns()
    records: list[dict[str, object]] = []
    ordinals: list[int] = []
    bad: list[tuple[int, str, str]] = []

    def flush() -> tuple[pa.Table, pa.Table]:
        keys = list(dict.fromkeys([*wanted, *(k for r in records for k in r)]))
        rows = [[_json_value(r.get(k)) for k in keys] for r in records]
        return _strings_table(keys, rows, ordinals), _unreadable(bad, source, run_id, recorded_at_us)

    with path.open(encoding="utf-8", errors="replace") as fh:
        ordinal = -1
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            ordinal += 1
            try:
                rec = json.loads(line, parse_float=str, parse_int=str)
            except json.JSONDecodeError as exc:
                bad.append((ordinal, f"line {lineno}: not JSON ({exc.msg})", redact_text(line.strip(), tokenizer, hidden)))
                continue
            if not isinstance(rec, dict):
                bad.append((ordinal, f"line {lineno}: a JSON {type(rec).__name__}, not an object",
                            redact_text(line.strip(), tokenizer, hidden)))
                continue
            records.append(rec)
            ordinals.append(ordinal)
            if len(records) >= batch_size:
                yield flush()
                records, ordinals, bad = [], [], []
    if records or bad:
        yield flush()


def read_parquet(path: Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str, recorded_at_us: int,
                 batch_size: int = 250_000) -> Iterator[tuple[pa.Table, pa.Table]]:
    pf = pq.ParquetFile(path)
    start = 0
    empty = _unreadable([], path.name, run_id, recorded_at_us)
    for batch in pf.iter_batches(batch_size=batch_size):
        table = pa.Table.from_batches([batch])
        table = table.append_column(SOURCE_ROW, pa.array(range(start, start + table.num_rows), pa.int64()))
        start += table.num_rows
        yield table, empty


_READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}


def read_file(path: str | Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str,
              recorded_at_us: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"input file {path} does not exist")
    fmt = mapping.format_for(path)
    _LOG.info("reading %s as %s", path, fmt)
    yield from _READERS[fmt](path, mapping, tokenizer, run_id=run_id, recorded_at_us=recorded_at_us)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, or every .csv/.jsonl/.parquet file in a named folder, sorted."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in {".csv", ".jsonl", ".ndjson", ".parquet"})
            if not found:
                raise MappingError(f"input folder {p} holds no .csv, .jsonl or .parquet file")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise MappingError(f"input {p} does not exist; pass --input with a file or a folder of files")
    return out


def parse_files(inputs: list[str | Path], mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str,
                keep_source: bool = False) -> tuple[pa.Table, int]:
    """Every file of ``inputs`` (files, or folders as :func:`expand_inputs` reads them) through the
    production parser, outside a pipeline (producers, demos, benchmarks): the canonical events in
    input order, and how many input records were not valid events. ``keep_source`` keeps the
    ``_source`` / ``_source_row`` columns (the de-duplication's tie-breaker)."""
    parts, rejected = [], 0
    for path in expand_inputs([str(p) for p in inputs]):
        for raw, unreadable in read_file(path, mapping, tokenizer, run_id=run_id, recorded_at_us=0):
            events, dead = parse_batch(raw, mapping=mapping, tokenizer=tokenizer, source=path.name, run_id=run_id,
                                       recorded_at_us=0)
            parts.append(events if keep_source else events.drop_columns([SOURCE, SOURCE_ROW]))
            rejected += dead.num_rows + unreadable.num_rows
    return pa.concat_tables(parts), rejected


def check_columns(path: Path, mapping: Mapping) -> None:
    """Fail before any work if a CSV header or Parquet schema lacks a column the mapping reads.

    (JSON Lines records carry their own keys; a key absent from a record is that record's
    ``missing_field`` dead letter, not a configuration error.)
    """
    fmt = mapping.format_for(path)
    if fmt == "csv":
        columns = _csv_header(path, mapping) or []
    elif fmt == "parquet":
        columns = pq.ParquetFile(path).schema_arrow.names
    else:
        return
    missing = [c for c in mapping.source_columns() if c not in columns]
    if missing:
        raise MappingError(f"the mapping reads column(s) {missing}, which {path} does not have; "
                           f"its columns are {[c for c in columns if not c.startswith('_')]}")


def read_labels_file(path: str | Path, *, run_id: str, recorded_at_us: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    """A labels feed (txn_id, is_fraud, label_time) as raw string batches, like :func:`read_file`."""
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    empty = _unreadable([], path.name, run_id, recorded_at_us)
    if suffix == ".parquet":
        table = pq.read_table(path)
    elif suffix == ".csv":
        names = next(csv.reader(path.open(newline="")), [])
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False))
    elif suffix in {".jsonl", ".ndjson", ".json"}:
        records, ordinals, bad = [], [], []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(x for x in fh if x.strip()):
                try:
                    rec = json.loads(line, parse_float=str, parse_int=str)
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    bad.append((i, f"record {i}: {exc}", line.strip()[:4000]))
                    continue
                records.append([_json_value(rec.get(k)) for k in ("txn_id", "is_fraud", "label_time")])
                ordinals.append(i)
        yield (_strings_table(["txn_id", "is_fraud", "label_time"], records, ordinals),
               _unreadable(bad, path.name, run_id, recorded_at_us))
        return
    else:
        raise MappingError(f"cannot tell the format of labels file {path}: name it .csv, .jsonl or .parquet")
    yield table.append_column(SOURCE_ROW, pa.array(range(table.num_rows), pa.int64())), empty
