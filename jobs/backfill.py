"""The batch backfill: files -> features -> Delta Lake, for a date range, idempotently."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions
from deltalake import DeltaTable

from finfeat import __version__
from finfeat.jobs import delta, testhooks
from finfeat.jobs.options import DEFAULT_MAX_EVENTS_PER_SLICE
from finfeat.jobs.sources import check_inputs, read_file, read_labels_file
from finfeat.pipelines.features import BuildFeatures
from finfeat.schemas import SCHEMA_VERSION
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import feature_schema
from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.schemas.labels import LABEL_SCHEMA
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.parse import CardTokenizer
from finfeat.transforms.spec import FeatureSpec

if TYPE_CHECKING:
    from finfeat.validation.validate import ValidationOutcome

_LOG = logging.getLogger(__name__)
_US_PER_DAY = 86_400_000_000
DEFAULT_MAX_DEAD_LETTER_FRACTION = 0.1


class ReconciliationError(RuntimeError):
    """Rows read != events accepted + dead letters: something was lost; nothing is committed."""


class TooManyDeadLetters(RuntimeError):
    """More than ``max_dead_letter_fraction`` of the rows read were rejected; nothing is committed."""


@dataclass(frozen=True)
class BackfillConfig:
    inputs: list[Path]
    mapping: Mapping
    warehouse: Path
    start: date
    end: date
    token_key: bytes
    spec: FeatureSpec = field(default_factory=FeatureSpec.default)
    buckets: int = 8
    labels: list[Path] = field(default_factory=list)
    #: expectation suite for feature rows (a built-in name or a YAML path); None skips validation
    feature_suite: str | None = "features"
    #: expectation suite for parsed events, run per batch; None skips it
    event_suite: str | None = "events"
    #: stop the run when more than this share of feature rows is quarantined
    max_quarantine_fraction: float = 0.01
    #: stop the run, before any commit, when more than this share of the rows read are dead letters
    max_dead_letter_fraction: float = DEFAULT_MAX_DEAD_LETTER_FRACTION
    #: allow replacing partitions that hold feature rows with empty ones or with fewer than half
    allow_shrink: bool = False
    #: also materialize the latest state per card and merchant into this online store
    #: (``sqlite:PATH`` or ``redis://HOST:PORT/DB``), after the Delta commits
    online_store: str | None = None
    #: an input of more events is cut into event-time slices of at most this many events, history
    #: included (see finfeat.jobs.slices); peak memory follows it
    max_events_per_slice: int = DEFAULT_MAX_EVENTS_PER_SLICE
    #: slices of this many days of the range instead (None: sized by ``max_events_per_slice``)
    slice_days: int | None = None
    beam_args: list[str] = field(default_factory=lambda: ["--runner=FnApiRunner"])
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                        + uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"--end {self.end} is before --start {self.start}; give an inclusive date range")
        if not self.inputs:
            raise ValueError("no input files; pass --input with a file or folder")
        for name in ("max_quarantine_fraction", "max_dead_letter_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} {value} is not a share between 0 and 1")
        if isinstance(self.max_events_per_slice, bool) or not isinstance(self.max_events_per_slice, int) \
                or self.max_events_per_slice < 1:
            raise ValueError(f"--max-events-per-slice {self.max_events_per_slice!r} is not a whole number of at least 1 "
                             f"(default {DEFAULT_MAX_EVENTS_PER_SLICE:,}): lower it to use less memory, raise it "
                             "for fewer slices")
        if self.slice_days is not None and (isinstance(self.slice_days, bool) or not isinstance(self.slice_days, int)
                                            or self.slice_days < 1):
            raise ValueError(f"--slice-days {self.slice_days!r} is not a whole number of days of at least 1; leave "
                             "it out to size slices by --max-events-per-slice")


#: Refusals the committer records in the run report (status failed) instead of raising them through
#: the runner; run_backfill raises them again by type from the report.
_REFUSALS = (TooManyDeadLetters, delta.ShrinkRefused, delta.CommitConflict, ReconciliationError)
_TYPED_ERRORS: dict[str, type[Exception]] = {cls.__name__: cls for cls in _REFUSALS}


def _day_us(d: date) -> int:
    return (d - date(1970, 1, 1)).days * _US_PER_DAY


class ReadFilesFn(beam.DoFn):
    def __init__(self, *, mapping: Mapping, token_key: bytes, run_id: str, recorded_at_us: int) -> None:
        self._mapping, self._key, self._run_id, self._recorded = mapping, token_key, run_id, recorded_at_us

    def process(self, path: str) -> Iterator[tuple[str, pa.Table, pa.Table]]:
        from finfeat.jobs import progress  # counts per batch for a progress display in this process

        tokenizer = CardTokenizer(self._key)
        for raw, unreadable in read_file(path, self._mapping, tokenizer, run_id=self._run_id,
                                         recorded_at_us=self._recorded):
            progress.rows_parsed(raw.num_rows + unreadable.num_rows)
            yield Path(path).name, raw, unreadable
        progress.file_done()


class ReadLabelsFn(beam.DoFn):
    def __init__(self, *, run_id: str, recorded_at_us: int) -> None:
        self._run_id, self._recorded = run_id, recorded_at_us

    def process(self, path: str) -> Iterator[tuple[str, pa.Table, pa.Table]]:
        for raw, unreadable in read_labels_file(path, run_id=self._run_id, recorded_at_us=self._recorded):
            yield Path(path).name, raw, unreadable


class WriteFeatureFilesFn(beam.DoFn):
    """Feature rows -> uncommitted Parquet files in the features table's folder, one per day.

    The files are written by a background thread (Parquet encoding releases the GIL), so the
    next table's features are computed meanwhile; the bundle's file list goes to the committer
    when the bundle ends. With a feature suite, its row-local expectations (see
    :func:`finfeat.validation.validate.split_row_local`) run here, on up to
    :data:`VALIDATE_ROWS` rows at a time (GX costs a fixed time per validation): only the rows
    they keep are written, and the outcome (without those rows) goes to the committer with the
    columns the other expectations read (uniqueness, table-level), for all rows. The
    committer validates those on the whole run and commits the files, or, if they quarantine
    rows, validates the gathered rows as a whole (see :class:`CommitRunFn`).
    """

    #: tables waiting for the writer thread at most (each is one bucket's rows)
    MAX_PENDING = 2
    #: with a feature suite, rows validated together (GX costs a fixed time per validation, so
    #: tables are gathered up to this many rows, which also bounds what is held)
    VALIDATE_ROWS = 500_000

    def __init__(self, *, cfg: BackfillConfig) -> None:
        self._cfg = cfg

    def setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finfeat-write")
        self._path = delta.table_path(self._cfg.warehouse, delta.FEATURES)
        self._local = self._rest_columns = None
        if self._cfg.feature_suite:
            from finfeat.validation.validate import split_row_local

            self._local, rest = split_row_local(self._cfg.feature_suite)
            self._rest_columns = rest.columns if rest.rules else None

    def start_bundle(self) -> None:
        self._pending: list = []
        self._done: list[delta.DataFile] = []
        self._held: list[pa.Table] = []

    def process(self, table: pa.Table) -> Iterator[tuple[int, tuple[str, object]]]:
        if self._local is None:
            self._write(table)
            return
        self._held.append(table)
        if sum(t.num_rows for t in self._held) >= self.VALIDATE_ROWS:
            yield from self._validate_and_write()

    def _validate_and_write(self) -> Iterator[tuple[int, tuple[str, object]]]:
        from finfeat.validation.validate import validate_table

        if not self._held:
            return
        table = pa.concat_tables(self._held)
        self._held = []
        if self._rest_columns is not None:
            yield 0, ("feature_columns", table.select([c for c in self._rest_columns if c in table.column_names]))
        outcome = validate_table(table, self._local, run_id=self._cfg.run_id, missing_columns="skip")
        yield 0, ("feature_validation", outcome.without_passed())
        self._write(outcome.passed)

    def _write(self, table: pa.Table) -> None:
        while len(self._pending) >= self.MAX_PENDING:
            self._done.extend(self._pending.pop(0).result())
        self._pending.append(self._pool.submit(delta.write_data_files, self._path, table, prefix=self._cfg.run_id))

    def finish_bundle(self) -> Iterator[object]:
        from apache_beam.transforms.window import GlobalWindows

        for item in self._validate_and_write():
            yield GlobalWindows.windowed_value(item)
        for future in self._pending:
            self._done.extend(future.result())
        files, self._pending, self._done = self._done, [], []
        yield GlobalWindows.windowed_value((0, ("feature_files", files)))

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)


class CommitRunFn(beam.DoFn):
    """The one committer: checks reconciliation and the guards, then writes every table.

    Each table is replaced under a key (features by date range, labels by txn id, dead letters
    and quarantined rows by the run key), so a rerun after a kill between two commits leaves every
    table as one clean run would; the run report names each table as soon as it is committed.
    """

    def __init__(self, *, cfg: BackfillConfig, recorded_at_us: int) -> None:
        self._cfg, self._recorded = cfg, recorded_at_us

    def process(self, item: tuple[int, list[tuple[str, object]]]) -> Iterator[dict[str, object]]:
        cfg = self._cfg
        _, tagged = item
        files = [f for kind, fs in tagged if kind == "feature_files" for f in fs]
        self._features_committed = False
        try:
            yield self._commit(tagged, files)
        except _REFUSALS as exc:
            self._discard(files)
            # a clean refusal, said once by run_backfill from the report (no runner traceback)
            delta.update_run_report(cfg.warehouse, cfg.run_id, status="failed",
                                    error={"type": type(exc).__name__, "message": str(exc)})
        except Exception as exc:
            self._discard(files)
            report = delta.read_run_report(cfg.warehouse, cfg.run_id) or {}
            if report.get("status") != "failed":
                delta.update_run_report(cfg.warehouse, cfg.run_id, status="failed",
                                        error={"type": type(exc).__name__, "message": str(exc)})
            raise

    def _discard(self, files: list[delta.DataFile]) -> None:
        """The workers' feature files, when the run ends before their commit (no reader sees them)."""
        if not self._features_committed:
            delta.discard_data_files(delta.table_path(self._cfg.warehouse, delta.FEATURES), files)

    def _commit(self, tagged: list[tuple[str, object]], files: list[delta.DataFile]) -> dict[str, object]:
        cfg = self._cfg
        schema = feature_schema(cfg.spec)
        dead = [t for kind, t in tagged if kind == "dead"]
        labels = [t for kind, t in tagged if kind == "labels"]
        quarantined_events = [t for kind, t in tagged if kind == "quarantine"]
        events = [t for kind, t in tagged if kind == "events"]
        event_failures = sorted({f for kind, f in tagged if kind == "failure"})
        stats: dict[str, int] = {}
        for kind, kv in tagged:
            if kind == "stat":
                stats[kv[0]] = stats.get(kv[0], 0) + kv[1]
        dead_table = pa.concat_tables(dead).cast(DEAD_LETTER_SCHEMA) if dead else DEAD_LETTER_SCHEMA.empty_table()
        if event_failures:
            delta.update_run_report(cfg.warehouse, cfg.run_id, status="failed", failures=event_failures,
                                    suite=cfg.event_suite)
            from finfeat.validation.validate import ValidationFailed

            raise ValidationFailed(event_failures, suite=cfg.event_suite)
        read, accepted = stats.get("rows_read", 0), stats.get("events_accepted", 0)
        quarantined_n = stats.get("events_quarantined", 0)
        label_dead = pa.compute.sum(pa.compute.equal(dead_table.column("stage"), "labels")).as_py() or 0
        event_dead = dead_table.num_rows - label_dead
        if read != accepted + event_dead + quarantined_n:
            raise ReconciliationError(f"rows read {read} != events accepted {accepted} + dead letters "
                                      f"{event_dead} + quarantined {quarantined_n}; nothing was committed")
        label_read, label_ok = stats.get("label_rows_read", 0), stats.get("labels_accepted", 0)
        if label_read != label_ok + label_dead:
            raise ReconciliationError(f"label rows read {label_read} != labels accepted {label_ok} + dead letters "
                                      f"{label_dead}; nothing was committed")
        by_reason: dict[str, int] = {}
        for stage, reason in zip(dead_table.column("stage").to_pylist(), dead_table.column("reason").to_pylist()):
            if stage != "labels":
                by_reason[reason] = by_reason.get(reason, 0) + 1
        if read and event_dead > cfg.max_dead_letter_fraction * read:
            top = ", ".join(f"{r} {n:,}" for r, n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:4])
            raise TooManyDeadLetters(
                f"{event_dead:,} of {read:,} rows read ({event_dead / read:.1%}) are dead letters ({top}), more "
                f"than --max-dead-letter-fraction {cfg.max_dead_letter_fraction:g} allows; nothing was committed. "
                "Check the input and the mapping (format, time format, columns), or raise "
                "--max-dead-letter-fraction if this share is expected")
        metadata = {
            "finfeat.run_id": cfg.run_id, "finfeat.code_version": __version__,
            "finfeat.schema_version": SCHEMA_VERSION, "finfeat.spec_hash": cfg.spec.spec_hash,
            "finfeat.range": f"{cfg.start.isoformat()}..{cfg.end.isoformat()}",
        }
        features_path = delta.table_path(cfg.warehouse, delta.FEATURES)
        feature_table = None  # the gathered rows, only when the whole-table expectations quarantine some
        outcome = None
        if cfg.feature_suite:
            outcome = self._validate_features(tagged, files, schema)
            if outcome.failures:
                delta.update_run_report(cfg.warehouse, cfg.run_id, status="failed",
                                        failures=list(outcome.failures), suite=cfg.feature_suite,
                                        validation=outcome.summary())
                outcome.raise_for_failures()
            if outcome.passed_rows is None:
                feature_table = outcome.passed
                self._discard(files)
        key = delta.run_key(inputs=cfg.inputs, labels=cfg.labels, start=cfg.start, end=cfg.end)
        tables: dict[str, dict[str, object]] = {}
        races: list[str] = []  # commits lost to concurrent writers (then retried)

        def committed(name: str, path: str, write: Callable[[], int | None]) -> None:
            before = DeltaTable(path).version() if DeltaTable.is_deltatable(path) else None
            version = write()
            if name == "features":
                self._features_committed = True
            if version is not None or not name.startswith("quarantine/"):
                tables[name] = {"path": path, "version": version}
            if version is not None and version != before:
                delta.update_run_report(cfg.warehouse, cfg.run_id, committed={name: version})
            testhooks.reached(f"after:{name}")

        testhooks.commit_barrier()
        testhooks.reached("before:commit")
        if feature_table is None:
            committed("features", features_path, lambda: delta.commit_data_files(
                features_path, files, schema=schema, start=cfg.start, end=cfg.end, metadata=metadata,
                allow_shrink=cfg.allow_shrink, races=races))
        else:
            committed("features", features_path, lambda: delta.overwrite_partitions(
                features_path, feature_table, start=cfg.start, end=cfg.end, metadata=metadata,
                allow_shrink=cfg.allow_shrink, races=races))
        dead_path = delta.table_path(cfg.warehouse, delta.DEAD_LETTERS)
        committed("dead_letters", dead_path, lambda: delta.replace_dead_letters(dead_path, dead_table, key=key,
                                                                               metadata=metadata, races=races))
        labels_path = delta.table_path(cfg.warehouse, delta.LABELS)
        label_table = pa.concat_tables(labels) if labels else LABEL_SCHEMA.empty_table()
        committed("labels", labels_path, lambda: delta.upsert_labels(labels_path, label_table, metadata=metadata,
                                                                      races=races))
        from finfeat.schemas.quarantine import PARTITION_COLUMN as QUARANTINED_DATE
        from finfeat.validation.quarantine import quarantine_path

        for suite, rows in (("features", outcome.quarantined if outcome is not None else None),
                            ("events", pa.concat_tables(quarantined_events) if quarantined_events else None)):
            path = quarantine_path(cfg.warehouse, suite)
            if rows is None or rows.num_rows == 0:
                # nothing quarantined now; still clear what an earlier run of this key left there
                if not DeltaTable.is_deltatable(path):
                    continue
                held = pa.schema(DeltaTable(path).schema().to_arrow())
                rows = held.remove(held.get_field_index(delta.RUN_KEY)).empty_table() \
                    if delta.RUN_KEY in held.names else held.empty_table()
            rows = _fill_run_id(rows, cfg.run_id)
            committed(f"quarantine/{suite}", path, lambda: delta.replace_run_rows(
                path, rows, key=key, partition_by=[QUARANTINED_DATE], metadata=metadata, races=races))
        online = None
        if cfg.online_store:
            from finfeat.jobs.online import open_store
            from finfeat.jobs.online.materialize import materialize

            store = open_store(cfg.online_store, cfg.spec)
            try:
                written = materialize(store, pa.concat_tables(events) if events else EVENT_SCHEMA.empty_table(),
                                      cfg.spec)
            finally:
                store.close()
            online = {"store": cfg.online_store, **{k: v for k, v in vars(written).items()
                                                    if isinstance(v, (int, float, str))}}
            delta.update_run_report(cfg.warehouse, cfg.run_id, committed={"online_store": cfg.online_store})
            testhooks.reached("after:online_store")
        report = {
            **{k.removeprefix("finfeat."): v for k, v in metadata.items()},
            "inputs": [str(p) for p in cfg.inputs],
            "run_key": key,
            "rows_read": read, "events_accepted": accepted, "dead_letters": event_dead,
            "events_quarantined": quarantined_n,
            "label_rows_read": label_read, "labels_accepted": label_ok, "label_dead_letters": label_dead,
            "labels_written": label_table.num_rows,
            "dead_letters_by_reason": dict(sorted(by_reason.items())),
            "events_outside_range": stats.get("events_outside_range", 0),
            "features_written": feature_table.num_rows if feature_table is not None else sum(f.rows for f in files),
            "status": "succeeded",
            "online_store": online,
            "validation": outcome.summary() if outcome is not None else None,
            "tables": tables,
            "commit_races_lost": races,
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        return delta.update_run_report(cfg.warehouse, cfg.run_id, **report)

    def _validate_features(self, tagged: list[tuple[str, object]], files: list[delta.DataFile],
                           schema: pa.Schema) -> ValidationOutcome:
        """The feature suite's outcome for the whole run: the workers' row-local outcomes combined,
        with the other expectations run here on the columns they read. If those quarantine rows,
        the run's rows are gathered (files and quarantined rows) and validated as one table, as
        without the split; that outcome's ``passed`` holds the rows to write (``passed_rows`` None).
        """
        from finfeat.validation.validate import (QuarantinePolicy, ValidationOutcome, as_suite, split_row_local,
                                                 validate_table)

        cfg = self._cfg
        policy = QuarantinePolicy(cfg.max_quarantine_fraction)
        suite = as_suite(cfg.feature_suite)
        local_suite, rest_suite = split_row_local(suite)
        parts = [o for kind, o in tagged if kind == "feature_validation"]
        local = (ValidationOutcome.combine(parts) if parts else
                 validate_table(schema.empty_table(), local_suite, run_id=cfg.run_id,
                                missing_columns="skip").without_passed())
        rest = None
        if rest_suite.rules:
            cols = [t for kind, t in tagged if kind == "feature_columns"]
            narrow = pa.concat_tables(cols) if cols else schema.empty_table().select(
                [c for c in rest_suite.columns if c in schema.names])
            rest = validate_table(narrow, rest_suite, run_id=cfg.run_id, missing_columns="skip")
        if rest is None or rest.quarantined.num_rows == 0:
            return ValidationOutcome.merge_split(suite, local, rest, policy=policy)
        _LOG.info("whole-table expectations quarantined %d row(s): validating the gathered feature rows",
                  rest.quarantined.num_rows)
        path = delta.table_path(cfg.warehouse, delta.FEATURES)
        pieces = [delta.read_data_file(path, f, schema) for f in files]
        if local.quarantined.num_rows:
            pieces.append(local.quarantined.select(schema.names).cast(schema))
        whole = pa.concat_tables(pieces) if pieces else schema.empty_table()
        return validate_table(whole, suite, run_id=cfg.run_id, policy=policy, missing_columns="skip")


def _fill_run_id(rows: pa.Table, run_id: str) -> pa.Table:
    """Quarantined rows carry the run's id (validation leaves it empty outside a run)."""
    index = rows.column_names.index("run_id")
    col = rows.column(index)
    filled = pa.compute.if_else(pa.compute.fill_null(pa.compute.equal(col, ""), True), pa.scalar(run_id), col)
    return rows.set_column(index, rows.schema.field(index), filled)


def build_backfill(pipeline: beam.Pipeline, cfg: BackfillConfig, *, recorded_at_us: int) -> None:
    files = [str(p) for p in cfg.inputs]
    raw = (pipeline
           | "ListInputs" >> beam.Create(files)
           | "ReadFiles" >> beam.ParDo(ReadFilesFn(mapping=cfg.mapping, token_key=cfg.token_key, run_id=cfg.run_id,
                                                   recorded_at_us=recorded_at_us)))
    inputs: dict[str, beam.PCollection] = {"raw": raw}
    if cfg.labels:
        inputs["labels"] = (pipeline
                            | "ListLabelFiles" >> beam.Create([str(p) for p in cfg.labels])
                            | "ReadLabelFiles" >> beam.ParDo(ReadLabelsFn(run_id=cfg.run_id,
                                                                          recorded_at_us=recorded_at_us)))
    out = inputs | "BuildFeatures" >> BuildFeatures(
        mapping=cfg.mapping, spec=cfg.spec, token_key=cfg.token_key, run_id=cfg.run_id,
        recorded_at_us=recorded_at_us, emit_from_us=_day_us(cfg.start), event_suite=cfg.event_suite,
        emit_until_us=_day_us(cfg.end + timedelta(days=1)), buckets=cfg.buckets)
    stats = out["stats"] | "SumStats" >> beam.CombinePerKey(sum)
    # Feature rows are written where they are computed; their files' descriptions (and, with a
    # feature suite, the validation outcomes) and everything else (small) are gathered under one key.
    tagged = ((out["features"] | "WriteFeatureFiles" >> beam.ParDo(WriteFeatureFilesFn(cfg=cfg)),
               out["dead_letters"] | "TagDeadLetters" >> beam.Map(lambda t: (0, ("dead", t))),
               out["labels"] | "TagLabels" >> beam.Map(lambda t: (0, ("labels", t))),
               *([out["events"] | "TagEvents" >> beam.Map(lambda t: (0, ("events", t)))] if cfg.online_store else []),
               out["quarantined_events"] | "TagQuarantinedEvents" >> beam.Map(lambda t: (0, ("quarantine", t))),
               out["event_failures"] | "TagEventFailures" >> beam.Map(lambda f: (0, ("failure", f))),
               stats | "TagStats" >> beam.Map(lambda kv: (0, ("stat", kv))))
              | "FlattenForCommit" >> beam.Flatten())
    (tagged
     | "GatherRun" >> beam.GroupByKey()
     | "CommitToDelta" >> beam.ParDo(CommitRunFn(cfg=cfg, recorded_at_us=recorded_at_us)))


def run_backfill(cfg: BackfillConfig) -> dict[str, object]:
    """Run the backfill to completion and return its report (also saved under ``_runs/``): one
    pipeline, or event-time slices when the input holds more events than one slice may
    (:mod:`finfeat.jobs.slices`), committed once either way.

    The warehouse is checked first, before any input is read. The report is written at once with
    status ``running`` (host, pid), names each table as it is committed, and ends ``succeeded`` or
    ``failed``; a run killed on the way stays ``running`` until the next backfill into the same
    warehouse marks it ``interrupted``.
    """
    delta.check_warehouse(cfg.warehouse)
    check_inputs(cfg.inputs, cfg.mapping)
    if cfg.feature_suite:
        from finfeat.validation.suite import Suite

        Suite.load(cfg.feature_suite)  # a broken suite fails here, before any work
    if cfg.event_suite:
        from finfeat.validation.suite import Suite

        Suite.load(cfg.event_suite)
    delta.mark_interrupted_runs(cfg.warehouse)
    recorded_at_us = int(time.time() * 1_000_000)
    started = time.monotonic()
    options = PipelineOptions(cfg.beam_args)
    delta.write_run_report(cfg.warehouse, {
        "run_id": cfg.run_id, "status": "running", "started_at": datetime.now(timezone.utc).isoformat(),
        "range": f"{cfg.start.isoformat()}..{cfg.end.isoformat()}", "inputs": [str(p) for p in cfg.inputs],
        "label_inputs": [str(p) for p in cfg.labels],
        "run_key": delta.run_key(inputs=cfg.inputs, labels=cfg.labels, start=cfg.start, end=cfg.end),
        "committed": {}, **delta.process_identity()})
    testhooks.reached("started")
    from finfeat.jobs.slices import run_sliced, wants_slices

    try:
        if wants_slices(cfg):
            run_sliced(cfg, recorded_at_us=recorded_at_us)
        else:
            delta.update_run_report(cfg.warehouse, cfg.run_id, slices=1)
            with beam.Pipeline(options=options) as pipeline:
                build_backfill(pipeline, cfg, recorded_at_us=recorded_at_us)
    except Exception as exc:
        # The runner wraps errors raised in workers; the committer's report says what it was.
        failed = delta.read_run_report(cfg.warehouse, cfg.run_id) or {}
        if failed.get("status") == "failed":
            if failed.get("failures"):
                from finfeat.validation.validate import ValidationFailed

                raise ValidationFailed(failed["failures"], suite=failed.get("suite")) from None
            error = failed.get("error") or {}
            typed = _TYPED_ERRORS.get(str(error.get("type")))
            if typed is not None:
                raise typed(str(error.get("message"))) from None
        else:
            delta.update_run_report(cfg.warehouse, cfg.run_id, status="failed",
                                    error={"type": type(exc).__name__, "message": str(exc)})
        raise
    report = delta.read_run_report(cfg.warehouse, cfg.run_id)
    error = (report or {}).get("error") or {}
    if report and report.get("status") == "failed" and str(error.get("type")) in _TYPED_ERRORS:
        raise _TYPED_ERRORS[str(error.get("type"))](str(error.get("message")))
    if report is None or report.get("status") != "succeeded":
        raise RuntimeError(f"the pipeline finished without a finished run report for {cfg.run_id} "
                           f"(status {report.get('status') if report else 'missing'})")
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


