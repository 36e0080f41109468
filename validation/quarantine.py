"""The quarantine Delta tables: rows a ``drop`` expectation rejected, appended per run.

One table per suite (``<warehouse>/quarantine/<suite>``, e.g. ``warehouse/quarantine/features``),
because rows of different suites have different columns. Partitioned by ``quarantined_date``;
the schema merges, so a feature spec that gains a column keeps appending to the same table.
Written with delta-rs like the other tables (:mod:`finfeat.jobs.delta`).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake

from finfeat.schemas.quarantine import PARTITION_COLUMN, QUARANTINE_COLUMNS

QUARANTINE = "quarantine"


def quarantine_path(warehouse: str | Path, suite: str) -> str:
    """``<warehouse>/quarantine/<suite>``."""
    return str(Path(warehouse) / QUARANTINE / suite)


def append_quarantine(path: str, table: pa.Table, metadata: dict[str, str]) -> int | None:
    """Append quarantined rows (``ValidationOutcome.quarantined``) in one commit; the table's version.

    ``metadata`` is the commit's custom metadata (the backfill's ``finfeat.run_id``, ...). Rows
    whose ``run_id`` is empty get ``metadata["finfeat.run_id"]``. With no rows and an existing
    table nothing is written; with no rows and no table an empty table is created, so that readers
    always find one.
    """
    missing = [c for c in QUARANTINE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"not quarantined rows: columns {missing} are missing; pass ValidationOutcome.quarantined")
    exists = DeltaTable.is_deltatable(path)
    if table.num_rows == 0 and exists:
        return DeltaTable(path).version()
    run_id = metadata.get("finfeat.run_id")
    if run_id and table.num_rows:
        col = table.column("run_id")
        filled = pc.if_else(pc.fill_null(pc.equal(col, ""), True), pa.scalar(run_id), col)
        table = table.set_column(table.column_names.index("run_id"), table.schema.field("run_id"), filled)
    write_deltalake(path, table, partition_by=[PARTITION_COLUMN], mode="append",
                    schema_mode="merge" if exists else None,
                    commit_properties=CommitProperties(custom_metadata=metadata))
    return DeltaTable(path).version()
