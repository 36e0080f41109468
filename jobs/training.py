"""``finfeat training-set``: features joined with the labels known at a cut-off, pinned to Delta versions.

A training set is the feature rows of an ``event_date`` range joined with the labels table, as
both tables were at two recorded Delta versions, using only labels known at a cut-off time.
The same request gives the same rows (local engine or Spark, today or next year): the versions
and the cut-off are in the output's manifest, and nothing later than the cut-off is read.

Label maturity rule (cut-off ``C``, label delay / maturity window ``D``, default 7 days)
---------------------------------------------------------------------------------------
For each feature row (one transaction, ``event_date`` in ``[start, end]``):

1. ``event_time > C``: excluded (``after_cutoff``): the transaction itself is in C's future.
2. A label row with ``label_time <= C`` exists: labelled with it (``matured``; fraud or not).
   If a transaction has several (the labels table normally has one per txn id), the one with
   the latest ``label_time`` counts, then the larger ``source``.
3. No matured label and ``event_time <= C - D``: labelled **not fraud** (``assumed_negative``):
   it is older than the maturity window, so a fraud would have been reported by C.
4. Otherwise (no matured label, ``event_time > C - D``): excluded (``immature``): its fraud may
   not be reported yet, so labelling it 0 would teach the model that recent fraud is genuine.

Both bounds are inclusive, so a label that came with the event (``label_time = event_time + D``)
is matured exactly when its transaction stops being immature. A label counts only if
``label_time <= C``; the label column the features table carries (``is_fraud``, known at ingest
whatever its time) is never used and is not in the output. Labels replaced in the labels table
(a feed label overriding the event's own) are gone from later versions: pin the labels version
to reproduce a set.

Output: a folder of Parquet files (``part-*.parquet``) plus ``_finfeat_manifest.json`` (request,
versions, spec hash, counts per rule, columns). Rows are sorted by ``(event_time, txn_id)``.
Columns: the identity columns of the features table except ``is_fraud``, the feature columns,
then ``label`` (bool), ``label_status`` (``matured`` / ``assumed_negative``), ``label_time`` and
``label_source`` (both null for ``assumed_negative``).

Engines: ``local`` (delta-rs reads the pinned versions into Arrow, DuckDB runs the query) and
``spark`` (:mod:`finfeat.jobs.spark.training`: delta-spark reads the same versions with
``versionAsOf``); both run the query text of :func:`training_set_sql` and give identical output.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from finfeat.jobs.argtypes import delta_version as _version
from finfeat.jobs.argtypes import iso_date as _date
from finfeat.schemas.events import EVENT_TIME_TYPE
from finfeat.schemas.features import IDENTITY_COLUMNS, IDENTITY_FIELDS, PARTITION_COLUMN
from finfeat.schemas.labels import LABEL_SCHEMA

Engine = Literal["local", "spark"]
Dialect = Literal["duckdb", "spark"]

DEFAULT_LABEL_DELAY_DAYS = 7
MANIFEST_NAME = "_finfeat_manifest.json"
MANIFEST_KIND = "finfeat.training_set"
FORMAT_VERSION = 1
_US_PER_DAY = 86_400_000_000

#: The statuses a feature row can end with; the first two are in the output.
KEPT_STATUSES = ("matured", "assumed_negative")
ALL_STATUSES = (*KEPT_STATUSES, "immature", "after_cutoff")

RULE = ("label_time <= cutoff counts (latest such label per txn); without one, a transaction with "
        "event_time <= cutoff - delay is labelled not-fraud (assumed_negative), a later one is excluded "
        "(immature); event_time > cutoff is excluded (after_cutoff); the features table's is_fraud is not used")

LABEL_FIELDS: list[pa.Field] = [
    pa.field("label", pa.bool_(), nullable=False),
    pa.field("label_status", pa.string(), nullable=False),
    pa.field("label_time", EVENT_TIME_TYPE),
    pa.field("label_source", pa.string()),
]
#: Identity columns kept in a training set (the ingest-time label is dropped: it ignores time).
KEY_FIELDS: list[pa.Field] = [f for f in IDENTITY_FIELDS if f.name != "is_fraud"]
_NON_FEATURE = {*IDENTITY_COLUMNS, *(f.name for f in LABEL_FIELDS)}


class TrainingSetError(ValueError):
    """A training-set request cannot be served (missing table, bad range); the message says why."""


# ----------------------------------------------------------------------------------- request


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def parse_time(text: str) -> datetime:
    """ISO-8601 date or time -> aware UTC datetime (no offset = UTC; a bare date = its midnight)."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time, e.g. 2019-02-01T00:00:00Z") from None
    return _utc(dt)


def iso(dt: datetime) -> str:
    return _utc(dt).isoformat().replace("+00:00", "Z")


def to_us(dt: datetime) -> int:
    d = _utc(dt) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TrainingSetRequest:
    """What to build. ``None`` versions mean "the latest" and are pinned by :meth:`pinned`."""

    features_path: str
    labels_path: str
    start: date
    end: date
    cutoff: datetime
    label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS
    features_version: int | None = None
    labels_version: int | None = None

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise TrainingSetError(f"end {self.end} is before start {self.start}; give an inclusive date range")
        if self.label_delay_days < 0:
            raise TrainingSetError("the label delay must not be negative")
        object.__setattr__(self, "cutoff", _utc(self.cutoff))
        object.__setattr__(self, "features_path", str(Path(self.features_path).resolve()))
        object.__setattr__(self, "labels_path", str(Path(self.labels_path).resolve()))

    @classmethod
    def from_warehouse(cls, warehouse: str | Path, **kwargs: Any) -> TrainingSetRequest:
        from finfeat.jobs import delta

        return cls(features_path=delta.table_path(warehouse, delta.FEATURES),
                   labels_path=delta.table_path(warehouse, delta.LABELS), **kwargs)

    @property
    def mature_before(self) -> datetime:
        """Transactions at or before this time without a matured label count as not fraud."""
        return self.cutoff - timedelta(days=self.label_delay_days)

    def pinned(self) -> TrainingSetRequest:
        """The same request with both Delta versions fixed (the latest where none was given)."""
        from deltalake import DeltaTable

        for path, what in ((self.features_path, "features"), (self.labels_path, "labels")):
            if not DeltaTable.is_deltatable(path):
                raise TrainingSetError(f"no {what} Delta table at {path}: run `finfeat backfill` first "
                                       "(labels come from the events' label column or a --labels feed)")
        fv = self.features_version if self.features_version is not None else DeltaTable(self.features_path).version()
        lv = self.labels_version if self.labels_version is not None else DeltaTable(self.labels_path).version()
        for path, v, what in ((self.features_path, fv, "features"), (self.labels_path, lv, "labels")):
            latest = DeltaTable(path).version()
            if not 0 <= v <= latest:
                raise TrainingSetError(f"{what} version {v} does not exist (the table is at version {latest})")
        return replace(self, features_version=fv, labels_version=lv)


# ----------------------------------------------------------------------------------- schema


def feature_columns_of(schema: pa.Schema) -> list[str]:
    """The feature columns of a features table: everything after the identity columns."""
    return [n for n in schema.names if n not in IDENTITY_COLUMNS]


def features_schema_at(path: str, version: int) -> pa.Schema:
    from deltalake import DeltaTable

    return DeltaTable(path, version=version).to_pyarrow_dataset().schema


def output_schema(features_schema: pa.Schema) -> pa.Schema:
    feats = [pa.field(n, features_schema.field(n).type) for n in feature_columns_of(features_schema)]
    return pa.schema([*KEY_FIELDS, *feats, *LABEL_FIELDS])


def spec_hash_at(path: str, version: int) -> str | None:
    """``finfeat.spec_hash`` of the newest commit at or before ``version`` that records one."""
    from deltalake import DeltaTable

    for entry in sorted(DeltaTable(path, version=version).history(), key=lambda e: -e.get("version", -1)):
        if entry.get("version", -1) <= version and entry.get("finfeat.spec_hash"):
            return str(entry["finfeat.spec_hash"])
    return None


# ----------------------------------------------------------------------------------- the query


def _ts(dialect: Dialect, dt: datetime) -> str:
    text = _utc(dt).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"TIMESTAMPTZ '{text}+00:00'" if dialect == "duckdb" else f"TIMESTAMP '{text}+00:00'"


def training_set_sql(dialect: Dialect, feature_columns: list[str], *, cutoff: datetime, mature_before: datetime
                     ) -> str:
    """Every feature row of the view ``features`` with its ``label_status`` (all four statuses),
    joined with the latest matured label of the view ``labels``. One text for both engines."""
    keys = ", ".join(f.name for f in KEY_FIELDS)
    feats = "".join(f", f.{c}" for c in feature_columns)
    c, m = _ts(dialect, cutoff), _ts(dialect, mature_before)
    return f"""
WITH matured AS (
  SELECT txn_id, is_fraud, label_time, source FROM (
    SELECT txn_id, is_fraud, label_time, source,
           row_number() OVER (PARTITION BY txn_id ORDER BY label_time DESC, source DESC) AS rn
    FROM labels
    WHERE label_time <= {c}
  ) ranked
  WHERE rn = 1
),
joined AS (
  SELECT {", ".join(f"f.{k.name}" for k in KEY_FIELDS)}{feats},
         m.is_fraud AS m_fraud, m.label_time AS m_time, m.source AS m_source,
         CASE WHEN f.event_time > {c} THEN 'after_cutoff'
              WHEN m.is_fraud IS NOT NULL THEN 'matured'
              WHEN f.event_time <= {m} THEN 'assumed_negative'
              ELSE 'immature' END AS label_status
  FROM features f LEFT JOIN matured m ON f.txn_id = m.txn_id
)
SELECT {keys}{"".join(f", {col}" for col in feature_columns)},
       CASE WHEN label_status = 'matured' THEN m_fraud ELSE FALSE END AS label,
       label_status,
       CASE WHEN label_status = 'matured' THEN m_time END AS label_time,
       CASE WHEN label_status = 'matured' THEN m_source END AS label_source
FROM joined
"""


def counts_of(table: pa.Table, rows_in_range: int) -> dict[str, int]:
    """Row counts per outcome of the rule (``table`` holds every status)."""
    status = table.column("label_status")
    per_status = {s: int(pc.sum(pc.equal(status, s)).as_py() or 0) for s in ALL_STATUSES}
    fraud = int(pc.sum(pc.and_(pc.equal(status, "matured"), table.column("label"))).as_py() or 0)
    return counts_from(rows_in_range, per_status, fraud)


def counts_from(rows_in_range: int, per_status: dict[str, int], matured_fraud: int) -> dict[str, int]:
    out = {"rows_in_range": rows_in_range, **{s: int(per_status.get(s, 0)) for s in ALL_STATUSES}}
    out["matured_fraud"] = int(matured_fraud)
    out["matured_not_fraud"] = out["matured"] - out["matured_fraud"]
    out["rows"] = out["matured"] + out["assumed_negative"]
    return out


def finish(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Kept rows only, in the canonical column types and order, sorted by (event_time, txn_id)."""
    kept = table.filter(pc.is_in(table.column("label_status"), pa.array(KEPT_STATUSES)))
    kept = canonical(kept, schema)
    return kept.sort_by([("event_time", "ascending"), ("txn_id", "ascending")])


def canonical(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns in ``schema``'s order and types (engines differ in time-zone names,
    nullability flags and chunking, never in values)."""
    cols = []
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type:
            col = col.cast(f.type)
        cols.append(col.combine_chunks())
    return pa.Table.from_arrays(cols, schema=schema)


def manifest_for(req: TrainingSetRequest, *, engine: str, schema: pa.Schema, counts: dict[str, int],
                 spec_hash: str | None) -> dict[str, Any]:
    from finfeat import __version__

    return {
        "kind": MANIFEST_KIND, "format_version": FORMAT_VERSION, "engine": engine,
        "features": {"path": req.features_path, "version": req.features_version, "spec_hash": spec_hash},
        "labels": {"path": req.labels_path, "version": req.labels_version},
        "event_date_range": [req.start.isoformat(), req.end.isoformat()],
        "cutoff": iso(req.cutoff), "label_delay_days": req.label_delay_days, "mature_before": iso(req.mature_before),
        "rule": RULE, "counts": counts,
        "feature_columns": [f.name for f in schema if f.name not in _NON_FEATURE],
        "columns": schema.names, "code_version": __version__,
    }


# ----------------------------------------------------------------------------------- local engine


@dataclass
class TrainingSet:
    table: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_columns(self) -> list[str]:
        return list(self.manifest["feature_columns"])


def read_features(path: str, version: int, start: date, end: date, columns: list[str] | None = None) -> pa.Table:
    from deltalake import DeltaTable

    ds = DeltaTable(path, version=version).to_pyarrow_dataset()
    day = ds.schema.field(PARTITION_COLUMN).type
    flt = (pads.field(PARTITION_COLUMN) >= pa.scalar(start, day)) & (pads.field(PARTITION_COLUMN) <= pa.scalar(end, day))
    return ds.to_table(filter=flt, columns=columns)


def read_labels(path: str, version: int, cutoff: datetime) -> pa.Table:
    """Label rows known at ``cutoff`` (the ``label_date`` partitions after it are not read)."""
    from deltalake import DeltaTable

    ds = DeltaTable(path, version=version).to_pyarrow_dataset()
    flt = ((pads.field("label_date") <= pa.scalar(_utc(cutoff).date(), pa.date32()))
           & (pads.field("label_time") <= pa.scalar(to_us(cutoff), pa.int64()).cast(EVENT_TIME_TYPE)))
    return ds.to_table(filter=flt, columns=["txn_id", "is_fraud", "label_time", "source"])


def build_training_set(req: TrainingSetRequest, *, engine: Engine = "local", spark: Any = None) -> TrainingSet:
    """The training set of ``req`` (versions pinned first) with ``engine``."""
    req = req.pinned()
    if engine == "spark":
        from finfeat.jobs.spark.training import build_training_set_spark

        return build_training_set_spark(req, spark=spark)
    if engine != "local":
        raise TrainingSetError(f"unknown engine {engine!r}: local or spark")
    try:
        import duckdb
    except ImportError:
        raise TrainingSetError("the local engine needs duckdb: pip install -c constraints.txt -e \".[train]\"") from None

    fschema = features_schema_at(req.features_path, req.features_version)
    schema = output_schema(fschema)
    feats = feature_columns_of(fschema)
    try:
        features = read_features(req.features_path, req.features_version, req.start, req.end,
                                 columns=[*(f.name for f in KEY_FIELDS), *feats])
        labels = read_labels(req.labels_path, req.labels_version, req.cutoff)
    except FileNotFoundError as exc:
        raise TrainingSetError(f"a data file of features v{req.features_version} / labels v{req.labels_version} is "
                               f"gone ({exc}): versions older than the vacuum retention cannot be read any more"
                               ) from None
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET threads = 2")
        con.register("features", features)
        con.register("labels", labels)
        sql = training_set_sql("duckdb", feats, cutoff=req.cutoff, mature_before=req.mature_before)
        every = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    counts = counts_of(every, features.num_rows)
    table = finish(every, schema)
    return TrainingSet(table, manifest_for(req, engine="local", schema=schema, counts=counts,
                                           spec_hash=spec_hash_at(req.features_path, req.features_version)))


# ----------------------------------------------------------------------------------- files


def prepare_output(out: str | Path) -> Path:
    """An empty folder at ``out``; an earlier training set there is replaced, anything else refused."""
    out = Path(out)
    if out.exists():
        if out.is_file() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file()):
            raise TrainingSetError(f"{out} exists and is not a finfeat training set; choose a new --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_training_set(ts: TrainingSet, out: str | Path) -> Path:
    folder = prepare_output(out)
    pq.write_table(ts.table, folder / "part-00000.parquet", compression="zstd")
    write_manifest(folder, ts.manifest)
    return folder


def read_training_set(out: str | Path) -> TrainingSet:
    """A training set folder (either engine's) as one table in canonical types, sorted."""
    folder = Path(out)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise TrainingSetError(f"{folder} is not a finfeat training set (no {MANIFEST_NAME})")
    manifest = json.loads(manifest_path.read_text())
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")))
    table = pa.concat_tables([pq.read_table(p) for p in files]) if files else None
    schema = _schema_from_manifest(manifest, table)
    if table is None:
        return TrainingSet(schema.empty_table(), manifest)
    table = canonical(table, schema).sort_by([("event_time", "ascending"), ("txn_id", "ascending")])
    return TrainingSet(table, manifest)


def _schema_from_manifest(manifest: dict[str, Any], table: pa.Table | None) -> pa.Schema:
    fschema = features_schema_at(manifest["features"]["path"], manifest["features"]["version"]) \
        if table is None else table.schema
    feats = [pa.field(n, fschema.field(n).type) for n in manifest["feature_columns"]]
    return pa.schema([*KEY_FIELDS, *feats, *LABEL_FIELDS])


# ----------------------------------------------------------------------------------- labels helper


def labels_from_features(features: pa.Table, delay_days: float = DEFAULT_LABEL_DELAY_DAYS) -> pa.Table:
    """Label rows (``LABEL_SCHEMA``) for the labelled rows of a features table, as the backfill
    derives them from the events' own label column: ``label_time = event_time + delay``,
    ``source = "events"``. Rows without a label (``is_fraud`` null) get none."""
    labelled = features.filter(pc.is_valid(features.column("is_fraud")))
    t = labelled.column("event_time").cast(pa.int64()).to_numpy() + int(round(delay_days * _US_PER_DAY))
    return pa.Table.from_arrays(
        [labelled.column("txn_id").combine_chunks(), labelled.column("is_fraud").combine_chunks(),
         pa.array(t, pa.int64()).cast(EVENT_TIME_TYPE),
         pa.array(np.full(len(t), "events", dtype=object), pa.string()),
         pa.array(np.floor_divide(t, _US_PER_DAY), pa.int64()).cast(pa.int32()).cast(pa.date32())],
        schema=LABEL_SCHEMA)


# ----------------------------------------------------------------------------------- CLI






def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    p.add_argument("--features-version", type=_version, help="Delta version of the features table (default latest)")
    p.add_argument("--labels-version", type=_version, help="Delta version of the labels table (default latest)")
    p.add_argument("--label-delay-days", type=float, default=DEFAULT_LABEL_DELAY_DAYS,
                   help="maturity window: a transaction this much older than the cut-off without a label "
                        "counts as not fraud (default 7)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "training-set", help="features joined with the labels known at a cut-off, pinned to Delta versions; "
                        "or your own rows, point in time (--entities)",
        description=__doc__.split("\n\n")[0] + "\n\nRule: " + RULE, allow_abbrev=False,
        epilog="With --entities FILE instead of a date range: your rows (txn_id or card_token, timestamp, any other "
               "columns, kept as they are) with the feature values as of each row's timestamp, from the features "
               "table: a txn_id row gets its transaction's row if it happened by then; a card_token row gets the "
               "windows of a transaction of that card at that time (merchant_id and amount_minor columns, when "
               "present, fill in the merchant features, the new-merchant flag and the z-score).")
    p.add_argument("--start", type=_date, help="first event date, UTC, inclusive (required without --entities)")
    p.add_argument("--end", type=_date, help="last event date, UTC, inclusive (required without --entities)")
    p.add_argument("--cutoff", type=parse_time,
                   help="label cut-off, ISO-8601 (no offset = UTC): only labels with label_time <= it count "
                        "(required without --entities)")
    p.add_argument("--entities", metavar="FILE",
                   help="your own rows instead of a date range: a Parquet or CSV file with txn_id or card_token, "
                        "timestamp and any other columns; each row gets the features as of its timestamp "
                        "(--out is then a .parquet file)")
    p.add_argument("--feature-spec", help="--entities: feature spec YAML of the table (default: the built-in v1 set)")
    p.add_argument("--out", required=True, help="output folder (Parquet files + _finfeat_manifest.json), or with "
                                                "--entities a .parquet file")
    p.add_argument("--engine", choices=["local", "spark"], default="local",
                   help="local (delta-rs + DuckDB, default) or spark (delta-spark; needs the [spark] extra "
                        "and bash jobs/spark/fetch_jars.sh)")
    add_common_arguments(p)
    return p


def _run_entities(args: argparse.Namespace) -> int:
    from finfeat.jobs.historical import EntityRowsError, historical_features

    if args.start or args.end or args.cutoff:
        print("finfeat training-set: error: --entities takes its times from the rows' timestamp column; "
              "leave out --start, --end and --cutoff", file=sys.stderr)
        return 2
    try:
        res = historical_features(args.entities, warehouse=args.warehouse, features_version=args.features_version,
                                  feature_spec=args.feature_spec)
    except (EntityRowsError, ValueError) as exc:
        print(f"finfeat training-set: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(res.table, out, compression="zstd")
    lines = [f"point-in-time features for {res.rows:,} {res.key} rows of {args.entities} "
             f"(features v{res.features_version}, spec {res.spec_hash})"]
    if res.key == "txn_id":
        lines.append(f"  {res.rows - res.rows_without_features:,} rows joined; {res.rows_without_features:,} all null "
                     "(transaction unknown, or after the row's timestamp)")
    else:
        lines.append(f"  {res.rows - res.rows_without_features:,} rows with card history; "
                     f"{res.rows_without_features:,} without (unknown card or no transaction before the timestamp)")
        if res.short_history:
            lines.append(f"  warning: {res.short_history:,} rows reach back before the table's first event: "
                         "their windows see only what was backfilled")
        if res.null_features:
            lines.append(f"  null for every row (the rows lack merchant_id / amount_minor, or the table keeps no "
                         f"coordinates): {', '.join(res.null_features)}")
    lines.append(f"  -> {out}")
    print("\n".join(lines))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.entities:
        return _run_entities(args)
    missing = [f"--{n}" for n in ("start", "end", "cutoff") if getattr(args, n) is None]
    if missing:
        print(f"finfeat training-set: error: {', '.join(missing)} required (or --entities FILE)", file=sys.stderr)
        return 2
    try:
        req = TrainingSetRequest.from_warehouse(
            args.warehouse, start=args.start, end=args.end, cutoff=args.cutoff,
            label_delay_days=args.label_delay_days, features_version=args.features_version,
            labels_version=args.labels_version)
        if args.engine == "spark":
            from finfeat.jobs.spark.session import SparkSetupError, get_spark
            from finfeat.jobs.spark.training import build_training_set_spark, write_training_set_spark

            try:
                spark = get_spark()
            except SparkSetupError as exc:
                print(f"finfeat training-set: error: {exc}", file=sys.stderr)
                return 2
            df, manifest = build_training_set_spark(req.pinned(), spark=spark, as_dataframe=True)
            folder = write_training_set_spark(df, manifest, args.out)
        else:
            ts = build_training_set(req, engine="local")
            folder = write_training_set(ts, args.out)
            manifest = ts.manifest
    except TrainingSetError as exc:
        print(f"finfeat training-set: error: {exc}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"training set {manifest['event_date_range'][0]}..{manifest['event_date_range'][1]} "
          f"(cut-off {manifest['cutoff']}, delay {manifest['label_delay_days']} d, engine {manifest['engine']})\n"
          f"  features v{manifest['features']['version']} (spec {manifest['features']['spec_hash']}), "
          f"labels v{manifest['labels']['version']}\n"
          f"  rows {c['rows']:,}: {c['matured']:,} matured labels ({c['matured_fraud']:,} fraud), "
          f"{c['assumed_negative']:,} assumed not fraud; excluded {c['immature']:,} immature, "
          f"{c['after_cutoff']:,} after the cut-off\n"
          f"  -> {folder}")
    return 0

