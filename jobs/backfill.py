"""The batch backfill: files -> features -> Delta Lake, for a date range, idempotently."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from finfeat import __version__
from finfeat.jobs import delta
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

_LOG = logging.getLogger(__name__)
_US_PER_DAY = 86_400_000_000


class ReconciliationError(RuntimeError):
    """Rows read != events accepted + dead letters: something was lost; nothing is committed."""


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
    #: also materialize the latest state per card and merchant into this online store
    #: (``sqlite:PATH`` or ``redis://HOST:PORT/DB``), after the Delta commits
    online_store: str | None = None
    beam_args: list[str] = field(default_factory=lambda: ["--runner=FnApiRunner"])
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                        + uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"--end {self.end} is before --start {self.start}; give an inclusive date range")
        if not self.inputs:
            raise ValueError("no input files; pass --input with a file or folder")


def _day_us(d: date) -> int:
    return (d - date(1970, 1, 1)).days * _US_PER_DAY


class ReadFilesFn(beam.DoFn):
    def __init__(self, *, mapping: Mapping, token_key: bytes, run_id: str, recorded_at_us: int) -> None:
        self._mapping, self._key, self._run_id, self._recorded = mapping, token_key, run_id, recorded_at_us

    def process(self, path: str) -> Iterator[tuple[str, pa.Table, pa.Table]]:
        tokenizer = CardTokenizer(self._key)
        for raw, unreadable in read_file(path, self._mapping, tokenizer, run_id=self._run_id,
                                         recorded_at_us=self._recorded):
            yield Path(path).name, raw, unreadable


class ReadLabelsFn(beam.DoFn):
    def __init__(self, *, run_id: str, recorded_at_us: int) -> None:
        self._run_id, self._recorded = run_id, recorded_at_us

    def process(self, path: str) -> Iterator[tuple[str, pa.Table, pa.Table]]:
        for raw, unreadable in read_labels_file(path, run_id=self._run_id, recorded_at_us=self._recorded):
            yield Path(path).name, raw, unreadable


class CommitRunFn(beam.DoFn):
    """The one committer: checks reconciliation, then writes features and dead letters."""

    def __init__(self, *, cfg: BackfillConfig, recorded_at_us: int) -> None:
        self._cfg, self._recorded = cfg, recorded_at_us

    def process(self, item: tuple[int, list[tuple[str, object]]], features: list[pa.Table]
                ) -> Iterator[dict[str, object]]:
        cfg = self._cfg
        _, tagged = item
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
        feature_table = pa.concat_tables(features).cast(schema) if features else schema.empty_table()
        dead_table = pa.concat_tables(dead).cast(DEAD_LETTER_SCHEMA) if dead else DEAD_LETTER_SCHEMA.empty_table()
        if event_failures:
            delta.write_run_report(cfg.warehouse, {"run_id": cfg.run_id, "status": "failed",
                                                   "failures": event_failures, "suite": cfg.event_suite})
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
        metadata = {
            "finfeat.run_id": cfg.run_id, "finfeat.code_version": __version__,
            "finfeat.schema_version": SCHEMA_VERSION, "finfeat.spec_hash": cfg.spec.spec_hash,
            "finfeat.range": f"{cfg.start.isoformat()}..{cfg.end.isoformat()}",
        }
        outcome = None
        if cfg.feature_suite:
            from finfeat.validation.validate import QuarantinePolicy, validate_table

            outcome = validate_table(feature_table, cfg.feature_suite, run_id=cfg.run_id,
                                     policy=QuarantinePolicy(cfg.max_quarantine_fraction),
                                     missing_columns="skip")
            if outcome.failures:
                failed = {"run_id": cfg.run_id, "status": "failed", "failures": list(outcome.failures),
                          "suite": cfg.feature_suite, "validation": outcome.summary()}
                delta.write_run_report(cfg.warehouse, failed)
                outcome.raise_for_failures()
            feature_table = outcome.passed
        features_path = delta.table_path(cfg.warehouse, delta.FEATURES)
        dead_path = delta.table_path(cfg.warehouse, delta.DEAD_LETTERS)
        features_version = delta.overwrite_partitions(features_path, feature_table, start=cfg.start, end=cfg.end,
                                                      metadata=metadata)
        dead_version = delta.append_dead_letters(dead_path, dead_table, metadata=metadata)
        labels_path = delta.table_path(cfg.warehouse, delta.LABELS)
        label_table = pa.concat_tables(labels) if labels else LABEL_SCHEMA.empty_table()
        labels_version = delta.upsert_labels(labels_path, label_table, metadata=metadata)
        quarantine_version = None
        if outcome is not None and outcome.quarantined.num_rows:
            from finfeat.validation.quarantine import append_quarantine, quarantine_path

            quarantine_version = append_quarantine(quarantine_path(cfg.warehouse, "features"), outcome.quarantined,
                                                   metadata)
        if quarantined_events:
            from finfeat.validation.quarantine import append_quarantine, quarantine_path

            append_quarantine(quarantine_path(cfg.warehouse, "events"), pa.concat_tables(quarantined_events),
                              metadata)
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
        by_reason: dict[str, int] = {}
        for stage, reason in zip(dead_table.column("stage").to_pylist(), dead_table.column("reason").to_pylist()):
            if stage != "labels":
                by_reason[reason] = by_reason.get(reason, 0) + 1
        report = {
            **{k.removeprefix("finfeat."): v for k, v in metadata.items()},
            "inputs": [str(p) for p in cfg.inputs],
            "rows_read": read, "events_accepted": accepted, "dead_letters": event_dead,
            "events_quarantined": quarantined_n,
            "label_rows_read": label_read, "labels_accepted": label_ok, "label_dead_letters": label_dead,
            "labels_written": label_table.num_rows,
            "dead_letters_by_reason": dict(sorted(by_reason.items())),
            "events_outside_range": stats.get("events_outside_range", 0),
            "features_written": feature_table.num_rows,
            "status": "succeeded",
            "online_store": online,
            "validation": outcome.summary() if outcome is not None else None,
            "tables": {"features": {"path": features_path, "version": features_version},
                       "dead_letters": {"path": dead_path, "version": dead_version},
                       "labels": {"path": labels_path, "version": labels_version},
                       **({"quarantine": {"path": str(Path(cfg.warehouse) / "quarantine" / "features"),
                                          "version": quarantine_version}} if quarantine_version is not None else {})},
        }
        delta.write_run_report(cfg.warehouse, report)
        yield report


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
    # Feature rows reach the committer as a side input, so Beam moves them with the Arrow coder;
    # everything else (small) is gathered under one key.
    tagged = ((out["dead_letters"] | "TagDeadLetters" >> beam.Map(lambda t: (0, ("dead", t))),
               out["labels"] | "TagLabels" >> beam.Map(lambda t: (0, ("labels", t))),
               *([out["events"] | "TagEvents" >> beam.Map(lambda t: (0, ("events", t)))] if cfg.online_store else []),
               out["quarantined_events"] | "TagQuarantinedEvents" >> beam.Map(lambda t: (0, ("quarantine", t))),
               out["event_failures"] | "TagEventFailures" >> beam.Map(lambda f: (0, ("failure", f))),
               stats | "TagStats" >> beam.Map(lambda kv: (0, ("stat", kv))))
              | "FlattenForCommit" >> beam.Flatten())
    (tagged
     | "GatherRun" >> beam.GroupByKey()
     | "CommitToDelta" >> beam.ParDo(CommitRunFn(cfg=cfg, recorded_at_us=recorded_at_us),
                                     features=beam.pvalue.AsList(out["features"])))


def run_backfill(cfg: BackfillConfig) -> dict[str, object]:
    """Run the backfill to completion and return its report (also saved under ``_runs/``)."""
    check_inputs(cfg.inputs, cfg.mapping)
    if cfg.feature_suite:
        from finfeat.validation.suite import Suite

        Suite.load(cfg.feature_suite)  # a broken suite fails here, before any work
    if cfg.event_suite:
        from finfeat.validation.suite import Suite

        Suite.load(cfg.event_suite)
    recorded_at_us = int(time.time() * 1_000_000)
    started = time.monotonic()
    options = PipelineOptions(cfg.beam_args)
    report_path = Path(cfg.warehouse) / delta.RUNS / f"{cfg.run_id}.json"
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_backfill(pipeline, cfg, recorded_at_us=recorded_at_us)
    except Exception:
        # The runner wraps errors raised in workers; a failed validation left a report saying so.
        if report_path.is_file():
            import json

            failed = json.loads(report_path.read_text())
            if failed.get("status") == "failed":
                from finfeat.validation.validate import ValidationFailed

                raise ValidationFailed(failed["failures"], suite=failed.get("suite")) from None
        raise
    if not report_path.is_file():
        raise RuntimeError(f"the pipeline finished without a run report at {report_path}")
    import json

    report = json.loads(report_path.read_text())
    report["seconds"] = round(time.monotonic() - started, 2)
    return report
