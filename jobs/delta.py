"""Delta Lake tables written with delta-rs: features (partition overwrite) and dead letters."""
from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake

from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import PARTITION_COLUMN

_LOG = logging.getLogger(__name__)

FEATURES = "features"
DEAD_LETTERS = "dead_letters"
LABELS = "labels"
RUNS = "_runs"


def table_path(warehouse: str | Path, name: str) -> str:
    return str(Path(warehouse) / name)


def overwrite_partitions(path: str, table: pa.Table, *, start: date, end: date, metadata: dict[str, str]) -> int:
    """Replace every ``event_date`` partition in ``[start, end]`` with ``table`` in one commit.

    Rows outside the range are refused; running the same write twice leaves the same content.
    """
    if table.num_rows:
        days = table.column(PARTITION_COLUMN)
        lo, hi = pa.compute.min(days).as_py(), pa.compute.max(days).as_py()
        if lo < start or hi > end:
            raise ValueError(f"feature rows span {lo}..{hi}, outside the backfill range {start}..{end}")
    predicate = f"{PARTITION_COLUMN} >= '{start.isoformat()}' AND {PARTITION_COLUMN} <= '{end.isoformat()}'"
    exists = DeltaTable.is_deltatable(path)
    write_deltalake(
        path, table, partition_by=[PARTITION_COLUMN], mode="overwrite",
        predicate=predicate if exists else None, schema_mode="merge" if exists else None,
        commit_properties=CommitProperties(custom_metadata=metadata),
    )
    return DeltaTable(path).version()


def append_dead_letters(path: str, table: pa.Table, *, metadata: dict[str, str]) -> int | None:
    if table.num_rows == 0 and DeltaTable.is_deltatable(path):
        return DeltaTable(path).version()
    write_deltalake(path, table.cast(DEAD_LETTER_SCHEMA), partition_by=["recorded_date"], mode="append",
                    commit_properties=CommitProperties(custom_metadata=metadata))
    return DeltaTable(path).version()


def write_run_report(warehouse: str | Path, report: dict[str, object]) -> Path:
    folder = Path(warehouse) / RUNS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{report['run_id']}.json"
    report["report_path"] = str(path)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return path


def upsert_labels(path: str, table: pa.Table, *, metadata: dict[str, str]) -> int | None:
    """Merge label rows by txn id: a feed's label replaces one that came with the event; the
    same rows merged twice change nothing."""
    from finfeat.schemas.labels import LABEL_SCHEMA

    table = table.cast(LABEL_SCHEMA)
    if not DeltaTable.is_deltatable(path):
        if table.num_rows == 0:
            return None
        write_deltalake(path, table, partition_by=["label_date"], mode="append",
                        commit_properties=CommitProperties(custom_metadata=metadata))
        return DeltaTable(path).version()
    if table.num_rows == 0:
        return DeltaTable(path).version()
    (DeltaTable(path)
     .merge(table, predicate="t.txn_id = s.txn_id", source_alias="s", target_alias="t",
            commit_properties=CommitProperties(custom_metadata=metadata))
     .when_matched_update_all(predicate="s.source <> 'events' OR t.source = 'events'")
     .when_not_matched_insert_all()
     .execute())
    return DeltaTable(path).version()


def read_table(path: str | Path, *, columns: list[str] | None = None, filters: object = None,
               version: int | None = None) -> pa.Table:
    """A Delta table (or a version of it) as one Arrow table.

    Reads through a single-threaded dataset scan rather than ``DeltaTable.to_pyarrow_table()``,
    whose threaded scan can leave Arrow threads behind that abort the interpreter at exit
    ("terminate called without an active exception", cf. delta-io/delta-rs#2184).
    ``filters`` is a pyarrow compute expression.
    """
    table = DeltaTable(str(path), version=version)
    return table.to_pyarrow_dataset().to_table(columns=columns, filter=filters, use_threads=False)
