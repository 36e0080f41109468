"""``finfeat stream``: Kafka -> the same parse, dedup and feature code -> Delta, exactly once.

The pipeline is the backfill's, made unbounded: messages are parsed by the batch parser
(``canonical`` mapping), duplicates dropped by txn id, features computed by
``ComputeFeatures`` on an unbounded PCollection (per-entity state, event-time timers, the
same engine), and feature rows committed to the backfill's Delta table layout in micro-
batches of event time.

Exactly once into Delta: one committer (a stateful step on a single key) writes each
micro-batch as a Delta commit carrying an application transaction ``(app id, version)``,
versions increasing by one. delta-rs does not reject a repeated transaction by itself, so
the committer reads ``transaction_version(app_id)`` first, and drops rows whose txn id the
table already holds. A restarted job replays the topic from the start of its retention
(rebuilding the windows' state), so a kill at any point loses nothing and duplicates
nothing; the dead-letter table is written the same way, keyed by source position.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import pvalue
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from finfeat import __version__
from finfeat.jobs import delta
from finfeat.pipelines.features import DEAD, ComputeFeatures, ParseBatchFn
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import PARTITION_COLUMN, feature_schema
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.parse import SOURCE_ROW, make_dead_letters
from finfeat.transforms.spec import FeatureSpec

_LOG = logging.getLogger(__name__)
MESSAGE_COLUMNS = ("txn_id", "card_token", "merchant_id", "merchant_category", "amount_minor", "currency",
                   "event_time", "channel", "card_lat", "card_lon", "merchant_lat", "merchant_lon", "is_fraud")


def _text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


class DecodeMessageFn(beam.DoFn):
    """A Kafka message -> a one-row raw table for the batch parser, or an ``unparseable`` dead letter."""

    def __init__(self, *, topic: str, run_id: str) -> None:
        self._topic, self._run_id = topic, run_id

    def process(self, msg: tuple[int, int, bytes]) -> Iterator[object]:
        from finfeat.jobs.kafka.messages import SCHEMA

        partition, offset, value = msg
        source = f"{self._topic}/{partition}"
        try:
            rec = json.loads(value, parse_float=str, parse_int=str)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            if rec.get("schema") != SCHEMA:
                raise ValueError(f"schema {rec.get('schema')!r} is not {SCHEMA}")
        except (ValueError, UnicodeDecodeError) as exc:
            text = value.decode("utf-8", "replace")[:4000] if value else ""
            yield pvalue.TaggedOutput(DEAD, make_dead_letters(
                run_id=self._run_id, stage="read", reasons=["unparseable"], details=[f"offset {offset}: {exc}"],
                source=source, source_rows=[offset], txn_ids=[None], payloads=[text],
                recorded_at_us=int(time.time() * 1e6)))
            return
        row = {c: [_text(rec.get(c))] for c in MESSAGE_COLUMNS}
        row[SOURCE_ROW] = [offset]
        table = pa.table({**{c: pa.array(v, pa.string()) for c, v in row.items() if c != SOURCE_ROW},
                          SOURCE_ROW: pa.array(row[SOURCE_ROW], pa.int64())})
        yield source, table, DEAD_LETTER_SCHEMA.empty_table()


class DropRepeatedTxnFn(beam.DoFn):
    """The first delivery of a txn id passes; repeats become ``duplicate_txn_id`` dead letters."""

    SEEN = ReadModifyWriteStateSpec("seen", VarIntCoder())

    def __init__(self, *, run_id: str) -> None:
        self._run_id = run_id

    def process(self, kv: tuple[str, pa.Table], seen=beam.DoFn.StateParam(SEEN)) -> Iterator[object]:
        txn, table = kv
        if seen.read() is None:
            seen.write(1)
            yield table.drop_columns(["_source", SOURCE_ROW])
            return
        yield pvalue.TaggedOutput(DEAD, make_dead_letters(
            run_id=self._run_id, stage="dedup", reasons=["duplicate_txn_id"],
            details=["txn id delivered again; the first delivery was kept"],
            source=table.column("_source").to_pylist(), source_rows=table.column(SOURCE_ROW).to_pylist(),
            txn_ids=[txn], payloads=[json.dumps(table.drop_columns(["_source", SOURCE_ROW]).to_pylist()[0],
                                                default=str, sort_keys=True)],
            recorded_at_us=int(time.time() * 1e6)))


def _late_dead_letter(row: dict, run_id: str) -> pa.Table:
    return make_dead_letters(
        run_id=run_id, stage="late", reasons=["late"],
        details=["arrived after features of later events were final; the next backfill repairs its day"],
        source="stream", source_rows=[-1], txn_ids=[row["txn_id"]],
        payloads=[json.dumps({k: v for k, v in row.items() if k != "event_time_us"}, default=str, sort_keys=True)],
        recorded_at_us=int(time.time() * 1e6))


def _row_key(table: pa.Table, columns: list[str]) -> pa.Array:
    """One string per row from ``columns`` (nulls as empty), to recognise rows already committed."""
    parts = [pc.fill_null(table.column(c).cast(pa.string()), "") for c in columns]
    return pc.binary_join_element_wise(*parts, "\x1f").combine_chunks() if len(parts) > 1 \
        else parts[0].combine_chunks()


class CommitMicroBatchFn(beam.DoFn):
    """The single committer: appends a micro-batch with the next application transaction."""

    LAST = ReadModifyWriteStateSpec("last", VarIntCoder())

    def __init__(self, *, path: str, app_id: str, kind: str, schema: pa.Schema, key_columns: list[str],
                 partition_by: str, metadata: dict[str, str]) -> None:
        self._path, self._app, self._kind, self._schema = path, app_id, kind, schema
        self._keys, self._partition, self._meta = key_columns, partition_by, metadata

    def process(self, kv: tuple[int, list[pa.Table]], last=beam.DoFn.StateParam(LAST)) -> Iterator[dict]:
        _, tables = kv
        batch = pa.concat_tables([t.cast(self._schema) for t in tables])
        exists = DeltaTable.is_deltatable(self._path)
        if exists and batch.num_rows:
            parts = pc.unique(batch.column(self._partition))
            held = delta.read_table(self._path, columns=self._keys,
                                    filters=pc.field(self._partition).isin(parts))
            if held.num_rows:
                seen = pc.is_in(_row_key(batch, self._keys), value_set=_row_key(held, self._keys))
                batch = batch.filter(pc.invert(seen))
        if batch.num_rows == 0:
            return
        committed = DeltaTable(self._path).transaction_version(self._app) if exists else None
        version = max(committed or 0, last.read() or 0) + 1
        write_deltalake(self._path, batch, mode="append", partition_by=[self._partition],
                        schema_mode="merge" if exists else None,
                        commit_properties=CommitProperties(custom_metadata=self._meta,
                                                           app_transactions=[Transaction(self._app, version)]))
        last.write(version)
        yield {"table": self._kind, "rows": batch.num_rows, "app_version": version}


def build_stream(p: beam.Pipeline, *, bootstrap: str, topic: str, warehouse: Path, spec: FeatureSpec,
                 app_id: str, run_id: str, token_key: bytes, bound_s: float, commit_every_s: float,
                 stop_after_idle_s: float | None, start: str = "earliest") -> None:
    from finfeat.jobs.kafka.source import ReadFromKafkaTopic

    mapping = Mapping.load("canonical")
    decoded = (p
               | "ReadKafka" >> ReadFromKafkaTopic(bootstrap=bootstrap, topic=topic, start=start, bound_s=bound_s,
                                                   stop_after_idle_s=stop_after_idle_s)
               | "DecodeMessages" >> beam.ParDo(DecodeMessageFn(topic=topic, run_id=run_id)).with_outputs(
                   DEAD, main="raw"))
    parsed = decoded.raw | "ParseEvents" >> beam.ParDo(
        ParseBatchFn(mapping=mapping, token_key=token_key, run_id=run_id, recorded_at_us=0)).with_outputs(
            DEAD, "stats", main="events")
    unique = (parsed.events
              | "KeyByTxnId" >> beam.Map(lambda t: (t.column("txn_id")[0].as_py(), t))
              | "DropRepeatedTxn" >> beam.ParDo(DropRepeatedTxnFn(run_id=run_id)).with_outputs(DEAD, main="events"))
    out = unique.events | "ComputeFeatures" >> ComputeFeatures(spec=spec)
    late = out["late"] | "LateToDeadLetters" >> beam.Map(_late_dead_letter, run_id)
    dead = (decoded[DEAD], parsed[DEAD], unique[DEAD], late) | "FlattenDeadLetters" >> beam.Flatten()
    meta = {"finfeat.run_id": run_id, "finfeat.code_version": __version__, "finfeat.spec_hash": spec.spec_hash,
            "finfeat.stream.app_id": app_id}
    window = beam.window.FixedWindows(commit_every_s)
    for kind, pcoll, schema, keys, part in (
            ("features", out["features"], feature_schema(spec), ["txn_id"], PARTITION_COLUMN),
            ("dead_letters", dead, DEAD_LETTER_SCHEMA, ["source", "source_row", "reason", "txn_id"],
             "recorded_date")):
        label = "".join(w.capitalize() for w in kind.split("_"))
        (pcoll
         | f"MicroBatch{label}" >> beam.WindowInto(window)
         | f"Key{label}" >> beam.Map(lambda t: (0, t))
         | f"Gather{label}" >> beam.GroupByKey()
         | f"Rewindow{label}" >> beam.WindowInto(beam.window.GlobalWindows())
         | f"Commit{label}" >> beam.ParDo(CommitMicroBatchFn(
             path=delta.table_path(warehouse, kind), app_id=f"{app_id}:{kind}", kind=kind, schema=schema,
             key_columns=keys, partition_by=part, metadata=meta)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="Kafka -> features -> Delta (and the online store), exactly once",
                       description="Any flag not listed is passed to Beam; the default runner is PrismRunner "
                                   "with --prism_location from .cache/prism/bin/prism when present.",
                       allow_abbrev=False)
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--topic", default="transactions")
    p.add_argument("--warehouse", default="warehouse")
    p.add_argument("--app-id", default="finfeat-stream", help="one id per job: names its Delta transactions")
    p.add_argument("--bound-seconds", type=float, default=5.0, help="bound on out-of-orderness (watermark lag)")
    p.add_argument("--commit-every-seconds", type=float, default=60.0,
                   help="event-time length of a Delta micro-batch")
    p.add_argument("--stop-after-idle", type=float, help="finish after this many seconds without messages")
    p.add_argument("--feature-spec")
    p.add_argument("--demo-key", action="store_true")


def default_prism() -> Path:
    return Path(__file__).resolve().parents[1] / ".cache" / "prism" / "bin" / "prism"


def run(args: argparse.Namespace, rest: list[str]) -> int:
    import uuid

    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from finfeat.jobs.cli import _beam_args, _token_key

    if not any(a.startswith("--runner") for a in rest):
        rest = ["--runner=PrismRunner", *rest]
        if default_prism().exists() and not any(a.startswith("--prism_location") for a in rest):
            rest.append(f"--prism_location={default_prism()}")
    beam_args = _beam_args(rest)
    spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = True
    run_id = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
    started = time.monotonic()
    with beam.Pipeline(options=options) as p:
        build_stream(p, bootstrap=args.bootstrap, topic=args.topic, warehouse=Path(args.warehouse), spec=spec,
                     app_id=args.app_id, run_id=run_id, token_key=_token_key(args, demo=False),
                     bound_s=args.bound_seconds, commit_every_s=args.commit_every_seconds,
                     stop_after_idle_s=args.stop_after_idle)
    features = delta.table_path(args.warehouse, delta.FEATURES)
    rows = delta.read_table(features, columns=["txn_id"]).num_rows if DeltaTable.is_deltatable(features) else 0
    print(f"stream {run_id} finished after {time.monotonic() - started:.1f} s: {rows:,} feature rows in {features}")
    return 0
