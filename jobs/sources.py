"""File sources: CSV, JSON Lines and Parquet read as Arrow batches of source columns.

Each reader yields ``(raw_batch, unreadable)`` pairs: ``raw_batch`` holds the source
columns plus ``_source_row`` (the record's 0-based number in its file); ``unreadable`` holds
dead letters for records that could not be read at all (a CSV row with the wrong number of
fields, a line that is not a JSON object or not UTF-8). Their payload holds no value of the
record, only its size and the tokens of the card numbers in it: its fields cannot be told apart,
so none can be trusted to be free of personal data. A file that cannot be read is one
``unreadable_file`` dead letter and the run goes on (:func:`read_file`). Nothing is dropped
silently.
"""
from __future__ import annotations

import csv
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from finfeat.schemas.mapping import Mapping, MappingError
from finfeat.schemas.redaction import card_runs, opaque_payload
from finfeat.transforms.parse import SOURCE, SOURCE_ROW, CardTokenizer, make_dead_letters, parse_batch

_LOG = logging.getLogger(__name__)

#: Longest field the record-by-record CSV reader accepts (Arrow's reads blocks of the same size);
#: a longer one makes its record an ``unparseable`` dead letter.
MAX_FIELD_CHARS = 1 << 24
csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
_SURROGATE = re.compile("[\udc80-\udcff]")  # an undecodable byte, read with errors="surrogateescape"
#: Leading bytes of compressed files: gzip is read directly, the others are refused by name.
_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
          b"\x28\xb5\x2f\xfd": "zstd"}
_COMPRESSED_SUFFIXES = {".gz": "gzip", ".zip": "zip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
INPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".csv.gz", ".jsonl.gz", ".ndjson.gz")


class BadFile(Exception):
    """A whole input file (or the rest of it) cannot be read; the message says what to do."""


def _opaque(text: str, tokenizer: CardTokenizer, **facts: object) -> str:
    """Payload of a record whose fields cannot be trusted: its size, the tokens of the card
    numbers in it, no value (see :func:`finfeat.schemas.redaction.opaque_payload`)."""
    clean = _SURROGATE.sub("", text)
    return opaque_payload(chars=len(text), card_tokens=[tokenizer.token(d) for d in card_runs(clean)], **facts)


def compression_of(path: Path) -> str | None:
    """``gzip``, another compression's name, or None, from the file's first bytes."""
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _open_text(path: Path, compression: str | None):  # noqa: ANN202 - a text file object
    """The file as text; undecodable bytes kept as surrogates so a record can be refused, not altered."""
    if compression == "gzip":
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="surrogateescape")
    return path.open(newline="", encoding="utf-8", errors="surrogateescape")


def _unreadable(rows: list[tuple[int, str, str]], source: str, run_id: str, recorded_at_us: int,
                reason: str = "unparseable", stage: str = "read") -> pa.Table:
    return make_dead_letters(
        run_id=run_id, stage=stage, reasons=[reason] * len(rows), details=[r[1] for r in rows],
        source=source, source_rows=[r[0] for r in rows], txn_ids=[None] * len(rows),
        payloads=[r[2] for r in rows], recorded_at_us=recorded_at_us,
    )


def _strings_table(columns: list[str], rows: list[list[str | None]], ordinals: list[int]) -> pa.Table:
    arrays = [pa.array([r[i] for r in rows], pa.string()) for i in range(len(columns))]
    return pa.Table.from_arrays([*arrays, pa.array(ordinals, pa.int64())], names=[*columns, SOURCE_ROW])


def _unique_names(names: list[str], read: list[str]) -> list[str]:
    """Column names made unique (a repeat of a column that is not ``read`` is renamed and never
    read); a repeated column that is read makes the file unreadable."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in (SOURCE, SOURCE_ROW):  # the reader's own bookkeeping columns
            name = f"_input{name}"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 1:
            out.append(name)
            continue
        if name in read:
            raise BadFile(f"column {name!r} appears {names.count(name)} times in its header and is read: rename the copies so that one column has that name, then rerun this file")
        out.append(f"_dup{seen[name]}_{name}")
    return out


def _csv_header(path: Path, mapping: Mapping) -> list[str] | None:
    with _open_text(path, compression_of(path)) as fh:
        header = next(csv.reader(fh, delimiter=mapping.csv.delimiter, quotechar=mapping.csv.quotechar), None)
    if header is None:
        return None
    header = [_SURROGATE.sub("\ufffd", h.strip()) for h in header]
    if header and header[0] == "":
        header[0] = "_index"  # pandas-style unnamed index column
    return header


def _read_csv_fast(path: Path, mapping: Mapping, header: list[str], batch_size: int,
                   skipped: list[int]) -> Iterator[pa.Table]:
    """Arrow's CSV reader; stops (appending the ordinal reached to ``skipped``) at the first block
    it cannot read: a row with the wrong number of fields, invalid UTF-8, a field longer than a
    block, a cut-off compressed file."""
    done = 0
    try:
        reader = pcsv.open_csv(
            pa.input_stream(str(path), compression="gzip" if compression_of(path) == "gzip" else None),
            read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter=mapping.csv.delimiter, quote_char=mapping.csv.quotechar,
                                            newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            table = table.append_column(SOURCE_ROW, pa.array(range(done, done + table.num_rows), pa.int64()))
            done += table.num_rows
            yield from (table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size))
    except (pa.ArrowInvalid, OSError, EOFError) as exc:  # the record-by-record reader goes as far as it can
        _LOG.info("%s: the fast reader stopped after record %d (%s); the rest is read record by record",
                  path.name, done, exc)
        skipped.append(done)


def read_csv(path: Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str, recorded_at_us: int,
             batch_size: int = 250_000) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Arrow's fast reader while every row is well formed; from the first malformed row on, the
    csv module, which knows each record's number and line, so every dead letter points home."""
    source = path.name
    header = _csv_header(path, mapping)
    if header is None:
        raise BadFile("the file is empty (no header, no records): re-export it if it should hold data, "
                      "else remove it")
    lacking = _lacking(header, mapping, path, show=False)
    if lacking:
        raise BadFile(f"{lacking}: re-export it with those columns, or read it with its own mapping")
    header = _unique_names(header, mapping.source_columns())
    resume_at: list[int] = []
    no_dead = _unreadable([], source, run_id, recorded_at_us)
    for table in _read_csv_fast(path, mapping, header, batch_size, resume_at):
        yield table, no_dead
    if not resume_at:
        return
    start = resume_at[0]
    with _open_text(path, compression_of(path)) as fh:
        reader = csv.reader(fh, delimiter=mapping.csv.delimiter, quotechar=mapping.csv.quotechar)
        next(reader, None)
        rows: list[list[str | None]] = []
        ordinals: list[int] = []
        bad: list[tuple[int, str, str]] = []
        ordinal = -1
        while True:
            line = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error):  # the file is cut off: hand over what was read, then fail
                if rows or bad:
                    yield _strings_table(header, rows, ordinals), _unreadable(bad, source, run_id, recorded_at_us)
                raise
            except csv.Error as exc:  # e.g. a field longer than the csv module's limit
                ordinal += 1
                if ordinal >= start:
                    bad.append((ordinal, f"line {line}: {exc}", opaque_payload(chars=0, error="csv")))
                continue
            if not record:  # a blank line: no record (as Arrow's reader counts them)
                continue
            ordinal += 1
            if ordinal < start:
                continue
            joined = "\x1f".join(record)
            if _SURROGATE.search(joined):
                bad.append((ordinal, f"line {line}: not valid UTF-8 text", _opaque(joined, tokenizer)))
                continue
            if len(record) != len(header):
                bad.append((ordinal, f"line {line}: {len(record)} fields, the header has {len(header)}",
                            _opaque(joined, tokenizer, fields=len(record))))
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
    wanted = mapping.source_columns()
    records: list[dict[str, object]] = []
    ordinals: list[int] = []
    bad: list[tuple[int, str, str]] = []

    def flush() -> tuple[pa.Table, pa.Table]:
        keys = list(dict.fromkeys([*wanted, *(k for r in records for k in r)]))
        rows = [[_json_value(r.get(k)) for k in keys] for r in records]
        return (_strings_table(_unique_names(keys, mapping.source_columns()), rows, ordinals),
                _unreadable(bad, source, run_id, recorded_at_us))

    with _open_text(path, compression_of(path)) as fh:
        ordinal = -1
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                ordinal += 1
                if _SURROGATE.search(line):
                    bad.append((ordinal, f"line {lineno}: not valid UTF-8 text", _opaque(line.strip(), tokenizer)))
                    continue
                try:
                    rec = json.loads(line, parse_float=str, parse_int=str)
                except (json.JSONDecodeError, RecursionError) as exc:
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                    bad.append((ordinal, f"line {lineno}: not JSON ({msg})", _opaque(line.strip(), tokenizer)))
                    continue
                if not isinstance(rec, dict):
                    bad.append((ordinal, f"line {lineno}: a JSON {type(rec).__name__}, not an object",
                                _opaque(line.strip(), tokenizer)))
                    continue
                records.append(rec)
                ordinals.append(ordinal)
                if len(records) >= batch_size:
                    yield flush()
                    records, ordinals, bad = [], [], []
        except (OSError, EOFError, zlib.error):  # the file is cut off: hand over what was read, then fail
            if records or bad:
                yield flush()
            raise
    if records or bad:
        yield flush()


def read_parquet(path: Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str, recorded_at_us: int,
                 batch_size: int = 250_000) -> Iterator[tuple[pa.Table, pa.Table]]:
    if compression_of(path) is not None:
        raise BadFile(f"a {compression_of(path)}-compressed file, not Parquet: decompress it (Parquet compresses "
                      "its own pages; write it with compression inside instead)")
    pf = pq.ParquetFile(path)
    lacking = _lacking(pf.schema_arrow.names, mapping, path, show=False)
    if lacking:
        raise BadFile(f"{lacking}: re-export it with those columns, or read it with its own mapping")
    names = _unique_names(pf.schema_arrow.names, mapping.source_columns())
    start = 0
    empty = _unreadable([], path.name, run_id, recorded_at_us)
    for batch in pf.iter_batches(batch_size=batch_size):
        table = pa.Table.from_batches([batch]).rename_columns(names)
        table = table.append_column(SOURCE_ROW, pa.array(range(start, start + table.num_rows), pa.int64()))
        start += table.num_rows
        yield table, empty


_READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}
#: What reading a file can raise when the file, not the code, is at fault.
_FILE_ERRORS = (BadFile, OSError, EOFError, ValueError, pa.ArrowException, csv.Error, zlib.error)


def _format_of(path: Path, mapping: Mapping) -> str:
    """The file's format; compressed files name what to do (gzip is read directly)."""
    compression = compression_of(path)
    if compression not in (None, "gzip"):
        raise BadFile(f"a {compression}-compressed file, which is not supported: decompress it, or compress it "
                      "with gzip (.csv.gz and .jsonl.gz are read directly)")
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix in _COMPRESSED_SUFFIXES and compression is None:
        raise BadFile(f"named {suffix} but not {_COMPRESSED_SUFFIXES[suffix]}-compressed data: rename or re-export it")
    try:
        return mapping.format_for(name)
    except MappingError as exc:
        raise BadFile(str(exc)) from None


def read_file(path: str | Path, mapping: Mapping, tokenizer: CardTokenizer, *, run_id: str,
              recorded_at_us: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Every record of one file as ``(raw_batch, unreadable)`` pairs.

    A file that cannot be read (empty, compressed other than gzip, not the format its name says,
    a repeated column the mapping reads, cut off in the middle) does not stop the run: it ends
    with one ``unreadable_file`` dead letter naming the file, the first record not read, and
    what to do; the records before it were yielded and count as usual.
    """
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"input file {path} does not exist")
    source = path.name
    next_row = 0
    try:
        fmt = _format_of(path, mapping)
        if path.stat().st_size == 0:
            raise BadFile("the file is empty (0 bytes): re-export it if it should hold data, else remove it")
        _LOG.info("reading %s as %s", path, fmt)
        for raw, unreadable in _READERS[fmt](path, mapping, tokenizer, run_id=run_id, recorded_at_us=recorded_at_us):
            for rows in (raw.column(SOURCE_ROW), unreadable.column("source_row")):
                if len(rows):
                    next_row = max(next_row, pc.max(rows).as_py() + 1)
            yield raw, unreadable
    except _FILE_ERRORS as exc:
        what = str(exc) if isinstance(exc, BadFile) else (
            f"{type(exc).__name__}: {exc}; check that it is a complete {path.suffix.lstrip('.') or 'data'} file "
            "(re-export or re-copy it), then rerun")
        where = "" if next_row == 0 else f" after {next_row:,} records"
        _LOG.warning("input file %s cannot be read%s: %s", source, where, what)
        empty = _strings_table(mapping.source_columns(), [], [])
        yield empty, _unreadable([(next_row, f"file {source} cannot be read{where}: {what}",
                                   opaque_payload(chars=0, file=source))],
                                 source, run_id, recorded_at_us, reason="unreadable_file")


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named directly, or the input files of a named folder, sorted; and a note for every
    file of a folder that was skipped: hidden files (``.DS_Store``, ``._x.csv``) and files that
    are not ``.csv``, ``.jsonl``, ``.ndjson``, ``.parquet`` (optionally ``.gz``)."""
    out: list[Path] = []
    skipped: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for q in sorted(p.iterdir()):
                if q.name.startswith("."):
                    skipped.append(f"{q}: hidden file")
                elif not q.is_file():
                    skipped.append(f"{q}: not a file")
                elif not q.name.lower().endswith(INPUT_SUFFIXES):
                    compression = _COMPRESSED_SUFFIXES.get(q.suffix.lower())
                    skipped.append(f"{q}: {compression}-compressed, not supported (decompress it, or use gzip)"
                                   if compression else f"{q}: not a .csv, .jsonl or .parquet file")
                else:
                    found.append(q)
            if not found:
                raise MappingError(f"input folder {p} holds no .csv, .jsonl or .parquet file (.gz allowed)"
                                   + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise MappingError(f"input {p} does not exist; pass --input with a file or a folder of files")
    for note in skipped:
        _LOG.warning("input skipped: %s", note)
    return out, skipped


def expand_inputs(inputs: list[str]) -> list[Path]:
    """The input files of :func:`list_inputs` (skipped files are logged)."""
    return list_inputs(inputs)[0]


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


def _columns(path: Path, mapping: Mapping) -> list[str] | None:
    """A CSV header or Parquet schema; None for JSON Lines and for a file that cannot be read
    (reading it gives an ``unreadable_file`` dead letter naming it)."""
    try:
        fmt = _format_of(path, mapping)
        if fmt == "csv":
            return _csv_header(path, mapping) or None
        if fmt == "parquet":
            return pq.ParquetFile(path).schema_arrow.names
    except _FILE_ERRORS:
        return None
    return None


def _lacking(columns: list[str], mapping: Mapping, path: Path, *, show: bool = True) -> str | None:
    """What the file lacks, or None. ``show`` lists its columns (for a message to the person
    running the job; never in a dead letter: a broken file's first line can be any data)."""
    missing = [c for c in mapping.source_columns() if c not in columns]
    if not missing:
        return None
    theirs = (f"its columns are {[c for c in columns if not c.startswith('_')][:50]}" if show
              else f"its first line has {len(columns)} field(s), not shown")
    return f"the mapping reads column(s) {missing}, which {path.name if not show else path} does not have; {theirs}"


def check_columns(path: Path, mapping: Mapping) -> None:
    """Fail before any work if a CSV header or Parquet schema lacks a column the mapping reads.

    (JSON Lines records carry their own keys; a key absent from a record is that record's
    ``missing_field`` dead letter, not a configuration error.)
    """
    columns = _columns(path, mapping)
    problem = _lacking(columns, mapping, path) if columns is not None else None
    if problem:
        raise MappingError(problem)


def check_inputs(paths: list[Path], mapping: Mapping) -> list[str]:
    """Fail before any work when the mapping fits none of the CSV and Parquet inputs (the mapping
    or the input is wrong); when it fits some, the others are bad files: returned as notes, and
    each becomes an ``unreadable_file`` dead letter when read, while the rest goes on."""
    problems, fitting = [], 0
    for path in paths:
        columns = _columns(path, mapping)
        if columns is None:
            continue
        problem = _lacking(columns, mapping, path, show=False)
        if problem:
            problems.append(problem)
        else:
            fitting += 1
    if problems and not fitting:
        first = next(p for p in paths if _columns(p, mapping) is not None)
        raise MappingError(_lacking(_columns(first, mapping), mapping, first)
                           + (f" (and {len(problems) - 1} more file(s) alike)" if len(problems) > 1 else ""))
    for note in problems:
        _LOG.warning("%s: the file will be a dead letter (unreadable_file)", note)
    return problems


_LABEL_COLUMNS = ["txn_id", "is_fraud", "label_time"]


def _label_records(path: Path, fmt: str, dead: list[tuple[int, str, str]]) -> pa.Table:
    """A labels file as one table of its columns (strings for CSV and JSON Lines) plus
    ``_source_row``; records that cannot be read are appended to ``dead``."""
    compression = compression_of(path)
    if fmt == "parquet":
        table = pq.read_table(path)
        table = table.rename_columns(_unique_names(table.column_names, _LABEL_COLUMNS))
        return table.append_column(SOURCE_ROW, pa.array(range(table.num_rows), pa.int64()))
    if fmt == "csv":
        try:
            with _open_text(path, compression) as fh:
                names = next(csv.reader(fh), [])
            table = pcsv.read_csv(pa.input_stream(str(path), compression=compression),
                                  convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                      strings_can_be_null=False))
            table = table.rename_columns(_unique_names(table.column_names, _LABEL_COLUMNS))
            return table.append_column(SOURCE_ROW, pa.array(range(table.num_rows), pa.int64()))
        except pa.ArrowInvalid:  # a bad row: read record by record, bad records become dead letters
            pass
        rows, ordinals = [], []
        with _open_text(path, compression) as fh:
            reader = csv.reader(fh)
            names = next(reader, [])
            ordinal = -1
            while True:
                line = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    ordinal += 1
                    dead.append((ordinal, f"line {line}: {exc}", opaque_payload(chars=0, error="csv")))
                    continue
                if not record:
                    continue
                ordinal += 1
                joined = "\x1f".join(record)
                if _SURROGATE.search(joined) or len(record) != len(names):
                    dead.append((ordinal, f"line {line}: not valid UTF-8 text" if _SURROGATE.search(joined)
                                 else f"line {line}: {len(record)} fields, the header has {len(names)}",
                                 opaque_payload(chars=len(joined))))
                    continue
                rows.append(record)
                ordinals.append(ordinal)
        return _strings_table(_unique_names(names, _LABEL_COLUMNS), rows, ordinals)
    records, ordinals = [], []
    with _open_text(path, compression) as fh:
        ordinal = -1
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            ordinal += 1
            try:
                if _SURROGATE.search(line):
                    raise ValueError("not valid UTF-8 text")
                rec = json.loads(line, parse_float=str, parse_int=str)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError) as exc:
                dead.append((ordinal, f"line {lineno}: {exc}", opaque_payload(chars=len(line.strip()))))
                continue
            records.append(rec)
            ordinals.append(ordinal)
    return label_records_table(records, ordinals)


def label_records_table(records: Sequence[dict[str, object]], ordinals: Sequence[int]) -> pa.Table:
    """JSON label records (objects read with numbers kept as text) -> the raw table
    :func:`~finfeat.transforms.labels.parse_labels` reads: the label columns as text (absent:
    null) and ``_source_row`` = ``ordinals``. Labels files (JSON Lines) and Kafka label messages
    both go through it."""
    rows = [[_json_value(rec.get(k)) for k in _LABEL_COLUMNS] for rec in records]
    return _strings_table(_LABEL_COLUMNS, rows, list(ordinals))


def read_labels_file(path: str | Path, *, run_id: str, recorded_at_us: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    """A labels feed (txn_id, is_fraud, label_time) as raw batches, like :func:`read_file`: bad
    records and an unreadable file are dead letters of stage ``labels``, and the run goes on."""
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"labels file {path} does not exist")
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    formats = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
    if suffix not in formats:
        raise MappingError(f"cannot tell the format of labels file {path}: name it .csv, .jsonl or .parquet")
    dead: list[tuple[int, str, str]] = []
    try:
        compression = compression_of(path)
        if compression not in (None, "gzip") or (compression == "gzip" and formats[suffix] == "parquet"):
            raise BadFile(f"a {compression}-compressed file, which is not supported here: decompress it")
        if path.stat().st_size == 0:
            raise BadFile("the file is empty (0 bytes): re-export it if it should hold labels, else remove it")
        table = _label_records(path, formats[suffix], dead)
    except _FILE_ERRORS as exc:
        what = str(exc) if isinstance(exc, BadFile) else f"{type(exc).__name__}: {exc}; re-export or re-copy it"
        _LOG.warning("labels file %s cannot be read: %s", path.name, what)
        yield (_strings_table(_LABEL_COLUMNS, [], []),
               _unreadable([(0, f"file {path.name} cannot be read: {what}", opaque_payload(chars=0, file=path.name))],
                           path.name, run_id, recorded_at_us, reason="unreadable_file", stage="labels"))
        return
    yield table, _unreadable(dead, path.name, run_id, recorded_at_us, stage="labels")
