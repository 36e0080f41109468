"""Training sets on Spark: the rule and output of :mod:`finfeat.jobs.training`, read with delta-spark.

delta-spark reads the very Delta versions the request pins (``versionAsOf``) of the tables that
delta-rs wrote, Spark SQL runs the query text of :func:`finfeat.jobs.training.training_set_sql`,
and the output folder has the same layout (Parquet part files + ``_finfeat_manifest.json``).
``read_training_set`` of either engine's folder gives equal tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finfeat.jobs.training import (
    ALL_STATUSES,
    KEPT_STATUSES,
    KEY_FIELDS,
    TrainingSet,
    TrainingSetRequest,
    canonical,
    counts_from,
    feature_columns_of,
    features_schema_at,
    manifest_for,
    output_schema,
    prepare_output,
    spec_hash_at,
    training_set_sql,
    write_manifest,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def read_delta(spark: SparkSession, path: str, version: int | None = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(path)


def build_training_set_spark(req: TrainingSetRequest, *, spark: SparkSession | None = None,
                             as_dataframe: bool = False) -> Any:
    """``TrainingSet`` (collected to Arrow), or ``(DataFrame, manifest)`` with ``as_dataframe``."""
    from pyspark.sql import functions as F

    if spark is None:
        from finfeat.jobs.spark.session import get_spark

        spark = get_spark()
    req = req.pinned()
    fschema = features_schema_at(req.features_path, req.features_version)
    schema = output_schema(fschema)
    feats = feature_columns_of(fschema)
    features = (read_delta(spark, req.features_path, req.features_version)
                .where((F.col("event_date") >= F.lit(req.start)) & (F.col("event_date") <= F.lit(req.end)))
                .select(*(f.name for f in KEY_FIELDS), *feats))
    labels = (read_delta(spark, req.labels_path, req.labels_version)
              .where(F.col("label_date") <= F.lit(req.cutoff.date()))
              .select("txn_id", "is_fraud", "label_time", "source"))
    features.createOrReplaceTempView("features")
    labels.createOrReplaceTempView("labels")
    every = spark.sql(training_set_sql("spark", feats, cutoff=req.cutoff, mature_before=req.mature_before))
    if not as_dataframe:  # counted, then collected: computed once (the caller's write computes it again)
        every = every.persist()
    try:
        groups = (every.groupBy("label_status")
                  .agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("label").cast("long")).alias("fraud"))
                  .collect())
        per_status = {r["label_status"]: int(r["n"]) for r in groups}
        fraud = sum(int(r["fraud"] or 0) for r in groups if r["label_status"] == "matured")
        unknown = set(per_status) - set(ALL_STATUSES)
        if unknown:
            raise AssertionError(f"unexpected label statuses {unknown}")
        counts = counts_from(sum(per_status.values()), per_status, fraud)
        manifest = manifest_for(req, engine="spark", schema=schema, counts=counts,
                                spec_hash=spec_hash_at(req.features_path, req.features_version))
        kept = (every.where(F.col("label_status").isin(*KEPT_STATUSES))
                .select(*schema.names).orderBy("event_time", "txn_id"))
        if as_dataframe:
            return kept, manifest
        table = canonical(kept.toArrow(), schema).sort_by([("event_time", "ascending"), ("txn_id", "ascending")])
        return TrainingSet(table, manifest)
    finally:
        if not as_dataframe:
            every.unpersist()


def write_training_set_spark(df: DataFrame, manifest: dict[str, Any], out: str | Path) -> Path:
    """Write with Spark (part files) into ``out``, then the manifest."""
    folder = prepare_output(out)
    df.write.mode("overwrite").option("compression", "zstd").parquet(str(folder))
    write_manifest(folder, manifest)
    return folder
