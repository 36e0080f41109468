"""The stream job's Delta micro-batch commit, exactly once, for every engine (no runner import).

One committer per table writes each micro-batch as a Delta append carrying an application
transaction ``(app id, version)``, versions increasing by one. delta-rs does not reject a
repeated transaction by itself, so the committer reads ``transaction_version(app_id)`` first
and drops the rows whose keys the table already holds: a job killed at any point and
restarted (it replays its input) leaves every row exactly once.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from finfeat.jobs import delta

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    table: str
    rows: int
    app_version: int


def row_key(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """One string per row from ``columns`` (nulls as empty), to recognise rows already committed."""
    parts = [pc.fill_null(table.column(c).cast(pa.string()), "") for c in columns]
    return pc.binary_join_element_wise(*parts, "\x1f").combine_chunks() if len(parts) > 1 \
        else parts[0].combine_chunks()


def commit_micro_batch(path: str, tables: Sequence[pa.Table], *, app_id: str, kind: str, schema: pa.Schema,
                       key_columns: Sequence[str], partition_by: str, metadata: dict[str, str],
                       last_version: int | None = None, match_partitions: bool = True) -> Committed | None:
    """Append ``tables`` to the Delta table at ``path`` as one commit with the next application
    transaction of ``app_id``, without the rows whose ``key_columns`` the table already holds
    (looked up in the batch's ``partition_by`` partitions when ``match_partitions``, else in the
    whole table). ``last_version``: the version this committer wrote last, if it remembers one
    (the next is above both it and the table's). None when there was nothing new to commit."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    batch = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
    exists = DeltaTable.is_deltatable(path)
    if exists:
        filters = None
        if match_partitions:
            filters = pc.field(partition_by).isin(pc.unique(batch.column(partition_by)))
        held = delta.read_table(path, columns=list(key_columns), filters=filters)
        if held.num_rows:
            seen = pc.is_in(row_key(batch, key_columns), value_set=row_key(held, key_columns))
            batch = batch.filter(pc.invert(seen))
    if batch.num_rows == 0:
        return None
    committed = DeltaTable(path).transaction_version(app_id) if exists else None
    version = max(committed or 0, last_version or 0) + 1
    write_deltalake(path, batch, mode="append", partition_by=[partition_by],
                    schema_mode="merge" if exists else None,
                    commit_properties=CommitProperties(custom_metadata=metadata,
                                                       app_transactions=[Transaction(app_id, version)]))
    _LOG.info("committed %d %s rows as %s version %d", batch.num_rows, kind, app_id, version)
    return Committed(kind, batch.num_rows, version)
