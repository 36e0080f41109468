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


#: The Sparkov CSV layout projected onto the canonical columns the query reads (card numbers as
#: they are: DuckDB does not tokenize).
_SPARKOV_CSV = """(SELECT trans_num AS txn_id, CAST(cc_num AS VARCHAR) AS card_token, merchant AS merchant_id,
        CAST(round(amt * 100) AS BIGINT) AS amount_minor,
        CAST(strptime(trans_date_trans_time, '%Y-%m-%d %H:%M:%S') AS TIMESTAMP) AT TIME ZONE 'UTC' AS event_time,
        merch_lat AS merchant_lat, merch_long AS merchant_lon
    FROM read_csv(getvariable('input_parquet'), header = true, all_varchar = false,
                  types = {'cc_num': 'VARCHAR', 'trans_num': 'VARCHAR', 'trans_date_trans_time': 'VARCHAR'}))"""


def duckdb_features_to_parquet(input_parquet: str, output_parquet: str, *,
                               threads: int | None = None, sparkov_csv: bool = False) -> int:
    """Compute every feature of the events in ``input_parquet`` into ``output_parquet``.

    Returns the number of rows written (one per input transaction). ``threads`` caps
    DuckDB's worker threads (default: DuckDB's own, one per core). ``sparkov_csv``: the input
    is a CSV in the Sparkov layout instead of canonical Parquet.
    """
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        con.execute(f"SET VARIABLE input_parquet = {_literal(str(input_parquet))}")
        query = feature_query()
        if sparkov_csv:
            query = query.replace("read_parquet(getvariable('input_parquet'))", _SPARKOV_CSV)
        result = con.execute(f"COPY ({query}) TO {_literal(str(output_parquet))} (FORMAT parquet)")
        return int(result.fetchone()[0])
    finally:
        con.close()


if __name__ == "__main__":  # python benchmarks/duckdb_features.py IN.parquet OUT.parquet
    import sys
    import time

    start = time.perf_counter()
    rows = duckdb_features_to_parquet(sys.argv[1], sys.argv[2])
    print(f"{rows} rows in {time.perf_counter() - start:.2f} s")
