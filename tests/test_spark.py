"""PySpark + delta-spark on the tables delta-rs writes: reads, training-set parity, maintenance.

Needs the ``[spark]`` extra and the Delta jars (``bash jobs/spark/fetch_jars.sh``). Skipped only
with ``FINFEAT_SKIP_SPARK=1``. Missing jars fail: under ``CI=true`` at once (``make test`` fetches
them first), elsewhere after one attempt to fetch them with Maven.
"""
from __future__ import annotations

import argparse
import os
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from finfeat.jobs.maintain import files_on_disk, maintain_table
from finfeat.jobs.training import (
    TrainingSetRequest,
    build_training_set,
    canonical,
    read_training_set,
    write_training_set,
)
from tests.training_fixtures import (  # noqa: F401  (fixtures)
    EDGE_CUTOFF,
    EDGE_DELAY_DAYS,
    EDGE_EXPECTED,
    EDGE_RANGE,
    add_late_label,
    edge_warehouse,
    small_files_copy,
    sparkov_warehouse,
)

UTC = timezone.utc

if os.environ.get("FINFEAT_SKIP_SPARK") == "1":
    pytest.skip("FINFEAT_SKIP_SPARK=1: the Spark tests are skipped on request", allow_module_level=True)


@pytest.fixture(scope="module")
def spark():  # noqa: ANN201
    from finfeat.jobs.spark import session

    problem = None
    try:
        session.check_pyspark()
        jars = session.delta_jars()
    except session.SparkSetupError as exc:
        problem = str(exc)
    if problem and "pyspark" not in problem:  # the jars are missing
        if os.environ.get("CI", "").lower() == "true":
            problem += " (CI: `make test` fetches them before the tests)"
        else:
            try:
                jars, problem = session.fetch_jars(), None
            except Exception as exc:  # noqa: BLE001
                problem += f"; fetching them failed too: {exc}"
    if problem:
        pytest.fail(problem, pytrace=False)
    s = session.get_spark("local[2]", app_name="finfeat-tests", jars=jars)
    yield s
    s.stop()


def _sorted(t: pa.Table, key: str = "txn_id") -> pa.Table:
    return t.sort_by([(key, "ascending")])


def test_session_uses_local_jars_only(spark) -> None:  # noqa: ANN001
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.jars.packages", None) is None
    jars = conf.get("spark.jars").split(",")
    assert any("delta-spark_2.13" in j for j in jars) and all(Path(j).is_file() for j in jars)
    assert conf.get("spark.ui.enabled") == "false" and conf.get("spark.driver.host") == "127.0.0.1"
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"


def test_spark_reads_the_tables_delta_rs_wrote(spark, sparkov_warehouse: Path, edge_warehouse: Path) -> None:  # noqa: ANN001
    for name in ("features", "labels"):
        path = str(sparkov_warehouse / name)
        ours = DeltaTable(path).to_pyarrow_table()
        theirs = spark.read.format("delta").load(path).toArrow()
        assert theirs.num_rows == ours.num_rows > 0
        assert _sorted(canonical(theirs, ours.schema)).equals(_sorted(ours)), name
    # time travel to a version delta-rs wrote before another commit
    add_late_label(edge_warehouse, "c_old_unlabelled", True, datetime(2024, 1, 19, tzinfo=UTC))
    labels = str(edge_warehouse / "labels")
    v0 = spark.read.format("delta").option("versionAsOf", 0).load(labels).count()
    v1 = spark.read.format("delta").load(labels).count()
    assert (v0, v1) == (DeltaTable(labels, version=0).to_pyarrow_table().num_rows,
                        DeltaTable(labels).to_pyarrow_table().num_rows) and v1 == v0 + 1


def test_training_set_parity_on_the_edge_cases(spark, edge_warehouse: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from finfeat.jobs import training as training_cli

    add_late_label(edge_warehouse, "c_old_unlabelled", True, datetime(2024, 1, 19, tzinfo=UTC))

    def request(labels_version: int | None) -> TrainingSetRequest:
        return TrainingSetRequest.from_warehouse(edge_warehouse, start=EDGE_RANGE[0], end=EDGE_RANGE[1],
                                                 cutoff=EDGE_CUTOFF, label_delay_days=EDGE_DELAY_DAYS,
                                                 labels_version=labels_version)

    # pinned to labels v0: collected to Arrow
    local = build_training_set(request(0), engine="local")
    on_spark = build_training_set(request(0), engine="spark", spark=spark)
    assert on_spark.table.equals(local.table)
    assert {**on_spark.manifest, "engine": "local"} == local.manifest
    got = {r["txn_id"]: (r["label_status"], r["label"]) for r in on_spark.table.to_pylist()}
    assert got == {k: v for k, v in EDGE_EXPECTED.items() if v[0] in ("matured", "assumed_negative")}
    # the latest labels (v1): written by Spark as part files (through the CLI) and by pyarrow, read back equal
    local = build_training_set(request(None), engine="local")
    parser = argparse.ArgumentParser(prog="finfeat")
    training_cli.add_parser(parser.add_subparsers(dest="command"))
    rc = training_cli.run(parser.parse_args(
        ["training-set", "--engine", "spark", "--warehouse", str(edge_warehouse), "--start", "2024-01-01",
         "--end", "2024-01-20", "--cutoff", "2024-01-20T00:00:00Z", "--out", str(tmp_path / "spark_ts")]))
    assert rc == 0 and list((tmp_path / "spark_ts").glob("part-*.parquet"))
    a = read_training_set(tmp_path / "spark_ts")
    b = read_training_set(write_training_set(local, tmp_path / "local_ts"))
    assert a.manifest["labels"]["version"] == 1 and {**a.manifest, "engine": "local"} == b.manifest
    assert dict(zip(a.table.column("txn_id").to_pylist(), a.table.column("label").to_pylist()))["c_old_unlabelled"]
    assert a.table.equals(b.table)


def test_training_set_parity_on_sparkov(spark, sparkov_warehouse: Path) -> None:  # noqa: ANN001
    for cutoff, start, end in ((datetime(2019, 1, 16, 12, tzinfo=UTC), date(2019, 1, 1), date(2019, 1, 15)),
                               (datetime(2020, 7, 1, tzinfo=UTC), date(2019, 1, 1), date(2020, 12, 31))):
        req = TrainingSetRequest.from_warehouse(sparkov_warehouse, start=start, end=end, cutoff=cutoff)
        local = build_training_set(req, engine="local")
        on_spark = build_training_set(req, engine="spark", spark=spark)
        assert local.table.num_rows > 5000
        assert on_spark.table.equals(local.table)
        assert {**on_spark.manifest, "engine": "local"} == local.manifest


def test_maintain_on_spark_then_delta_rs_reads_and_writes(spark, sparkov_warehouse: Path, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "features"
    content = small_files_copy(sparkov_warehouse / "features", path, parts=3, until=date(2019, 1, 4))  # 4 days
    files = len(DeltaTable(str(path)).file_uris())
    with pytest.raises(ValueError, match="under 24 h"):
        maintain_table(str(path), engine="spark", retention_hours=1, spark=spark)
    rep = maintain_table(str(path), engine="spark", retention_hours=7 * 24, spark=spark)
    assert rep.compacted and rep.files_removed == files and rep.files_after < files
    assert rep.vacuumed == [] and rep.files_on_disk_after == files + rep.files_after
    dt = DeltaTable(str(path))  # delta-rs reads what Spark committed
    assert dt.version() == rep.version_after > rep.version_before
    assert _sorted(dt.to_pyarrow_table()).equals(content)
    rep = maintain_table(str(path), engine="spark", retention_hours=0, force=True, compact=False, spark=spark)
    assert len(rep.vacuumed) == files and files_on_disk(path) == rep.files_after
    assert _sorted(DeltaTable(str(path)).to_pyarrow_table()).equals(content)
    # and delta-rs can still write to it after Spark's commits
    write_deltalake(str(path), content.slice(0, 0), mode="append", partition_by=["event_date"])
    assert _sorted(DeltaTable(str(path)).to_pyarrow_table()).equals(content)
    assert spark.read.format("delta").load(str(path)).count() == content.num_rows

