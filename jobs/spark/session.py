"""A local SparkSession with Delta Lake, from jars fetched once with Maven.

The Delta jars come from ``.cache/jars/`` (``bash jobs/spark/fetch_jars.sh`` puts them there;
``FINFEAT_SPARK_JARS`` names another folder) and go on ``spark.jars``. ``spark.jars.packages``
is never used: it resolves through Ivy and downloads when the session starts.

The session is local (``local[2]`` by default), binds to 127.0.0.1, has no UI, and keeps time
in UTC (``spark.sql.session.timeZone``), so timestamps read from and written to Delta and
Parquet are the same instants delta-rs and pyarrow see. Parquet timestamps are written as
``TIMESTAMP_MICROS`` (not INT96), which pyarrow reads as ``timestamp[us, tz=UTC]``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

#: Folder of the Delta jars; ``FINFEAT_SPARK_JARS`` overrides it.
JARS_ENV = "FINFEAT_SPARK_JARS"
REPO = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = Path(__file__).resolve().parent / "fetch_jars.sh"
DEFAULT_MASTER = "local[2]"
#: JVM flags of the local driver (which is also the executor): the client compiler only and the
#: serial collector start a short local job about twice as fast on a small, busy machine.
#: ``FINFEAT_SPARK_JAVA_OPTS`` replaces them (e.g. with "" for long jobs that want the C2 JIT).
FAST_START_JAVA_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
JAVA_OPTS_ENV = "FINFEAT_SPARK_JAVA_OPTS"


class SparkSetupError(RuntimeError):
    """pyspark or the Delta jars are missing, or Java is too old; the message says what to run."""


def jars_dir() -> Path:
    env = os.environ.get(JARS_ENV)
    return Path(env) if env else REPO / ".cache" / "jars"


def delta_jars(folder: Path | None = None) -> list[Path]:
    """The jars to put on ``spark.jars``; raises :class:`SparkSetupError` when they are absent."""
    folder = folder or jars_dir()
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    if not any(j.name.startswith("delta-spark_") for j in jars):
        raise SparkSetupError(
            f"the Delta Lake jars are not in {folder}: run `bash {_rel(FETCH_SCRIPT)}` once (Maven resolves "
            f"io.delta:delta-spark into {_rel(jars_dir())}; it is cached in ~/.m2), or set {JARS_ENV} to a "
            "folder holding them")
    return jars


def fetch_jars(folder: Path | None = None) -> list[Path]:
    """Run ``fetch_jars.sh`` (a no-op when the jars are there) and return them."""
    target = folder or jars_dir()
    if not shutil.which("mvn"):
        raise SparkSetupError("Maven (mvn) is needed once to fetch the Delta jars; install it "
                              "(apt-get install maven) or fetch them elsewhere and set " + JARS_ENV)
    subprocess.run(["bash", str(FETCH_SCRIPT), str(target)], check=True)
    return delta_jars(target)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
        import delta  # noqa: F401
    except ImportError as exc:
        raise SparkSetupError(f"the Spark engine needs pyspark and delta-spark ({exc}): "
                              "pip install -c constraints.txt -e \".[spark]\"") from None


def base_conf(jars: list[Path], *, shuffle_partitions: int = 2) -> dict[str, str]:
    """The session settings (also what the tests check)."""
    return {
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.extraJavaOptions": f"-Duser.timezone=UTC {os.environ.get(JAVA_OPTS_ENV, FAST_START_JAVA_OPTS)}",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": str(shuffle_partitions),
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.warehouse.dir": str(Path(tempfile.gettempdir()) / "finfeat-spark-warehouse"),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Delta's log replay is a Spark job: 50 partitions (the default) is slow on small local tables.
        "spark.databricks.delta.snapshotPartitions": str(shuffle_partitions),
        # VACUUM lists the table's folders as a Spark job with this many tasks (default 10000:
        # minutes of scheduling on a local session for a table of a few dozen folders).
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": str(shuffle_partitions),
        "spark.databricks.delta.optimize.maxThreads": "2",
        # Delta's own retention check is replaced by finfeat maintain's (>= 1 day unless --force).
        "spark.databricks.delta.retentionDurationCheck.enabled": "false",
        "spark.databricks.delta.vacuum.parallelDelete.enabled": "false",
        "spark.driver.memory": os.environ.get("FINFEAT_SPARK_DRIVER_MEMORY", "2g"),
    }


def get_spark(master: str = DEFAULT_MASTER, *, app_name: str = "finfeat", conf: Mapping[str, Any] | None = None,
              jars: list[Path] | None = None) -> SparkSession:
    """The (one per process) SparkSession, created with Delta Lake on the first call."""
    check_pyspark()
    jars = jars if jars is not None else delta_jars()
    java = shutil.which("java") if not os.environ.get("JAVA_HOME") else str(Path(os.environ["JAVA_HOME"]) / "bin/java")
    if not java:
        raise SparkSetupError("no Java found: Spark 4 needs a JDK 17+ on the PATH or in JAVA_HOME")
    major = java_major(java)
    if major is not None and major < 17:
        raise SparkSetupError(f"{java} is Java {major}; Spark 4 needs 17 or newer (set JAVA_HOME)")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**base_conf(jars), **(conf or {})}.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("FINFEAT_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def java_major(java: str) -> int | None:
    """The major version of a ``java`` binary (``java -version``), None if it cannot be told."""
    import re

    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    first = int(m.group(1))
    return int(m.group(2) or 0) if first == 1 else first  # "1.8.0" is Java 8


def stop_spark() -> None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
