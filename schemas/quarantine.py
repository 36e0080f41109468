"""Quarantined rows: rows an expectation with policy ``drop`` rejected, kept with the reasons.

A quarantine table holds the rows of one suite (``warehouse/quarantine/<suite>``): the row's own
columns as they were (all made nullable: a quarantined row may be missing a required value), then
``broken_expectations`` (the names of every expectation of the suite the row broke, in suite
order) and the run metadata columns below. It is partitioned by ``quarantined_date``.
"""
from __future__ import annotations

import pyarrow as pa

#: The names of the suite's expectations the row broke, in the order the suite declares them.
BROKEN_EXPECTATIONS = "broken_expectations"
PARTITION_COLUMN = "quarantined_date"

#: Columns every quarantined row ends with, after the row's own columns.
QUARANTINE_FIELDS: list[pa.Field] = [
    pa.field(BROKEN_EXPECTATIONS, pa.list_(pa.string()), nullable=False),
    pa.field("suite", pa.string(), nullable=False),                 # the suite's name, e.g. "features"
    pa.field("run_id", pa.string(), nullable=False),                # the run that quarantined it ("" outside a run)
    pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(PARTITION_COLUMN, pa.date32(), nullable=False),
]
QUARANTINE_COLUMNS = [f.name for f in QUARANTINE_FIELDS]


def quarantine_schema(row_schema: pa.Schema) -> pa.Schema:
    """The quarantine schema for rows of ``row_schema``: its fields (nullable), then the reasons and metadata."""
    clash = sorted(set(row_schema.names) & set(QUARANTINE_COLUMNS))
    if clash:
        raise ValueError(f"row columns {clash} clash with the quarantine's own columns; rename them")
    return pa.schema([*(f.with_nullable(True) for f in row_schema), *QUARANTINE_FIELDS],
                     metadata=row_schema.metadata)


def empty_quarantine(row_schema: pa.Schema) -> pa.Table:
    return quarantine_schema(row_schema).empty_table()
