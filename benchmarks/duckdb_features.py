"""Run ``duckdb_features.sql``: canonical events (Parquet) in, features (Parquet) out."""
from __future__ import annotations

from pathlib import Path

import duckdb

SQL_PATH = Path(__file__).with_name("duckdb_features.sql")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def feature_query() -> str:
    """The SELECT statement of ``duckdb_features.sql`` (reads ``getvariable('input_parquet')``)."""
    return SQL_PATH.read_text().strip().rstrip(";")


def duckdb_features_to_parquet(input_parquet: str, output_parquet: str, *,
                               threads: int | None = None) -> int:
    """Compute every feature of the events in ``input_parquet`` into ``output_parquet``.

    Returns the number of rows written (one per input transaction). ``threads`` caps
    DuckDB's worker threads (default: DuckDB's own, one per core).
    """
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        con.execute(f"SET VARIABLE input_parquet = {_literal(str(input_parquet))}")
        result = con.execute(
            f"COPY ({feature_query()}) TO {_literal(str(output_parquet))} (FORMAT parquet)")
        return int(result.fetchone()[0])
    finally:
        con.close()


if __name__ == "__main__":  # python benchmarks/duckdb_features.py IN.parquet OUT.parquet
    import sys
    import time

    start = time.perf_counter()
    rows = duckdb_features_to_parquet(sys.argv[1], sys.argv[2])
    print(f"{rows} rows in {time.perf_counter() - start:.2f} s")
