"""Arrow tables as compact IPC stream bytes, for Beam's coder and for pickling.

Beam moves our elements (whole Arrow tables) between stages. Plain pickling of a table read from
Parquet or sliced serializes each chunk's whole parent buffer: an eight-chunk column pickles eight
times its size. The IPC stream format writes only the rows each chunk holds, and is fast.
String columns that repeat a few values (card tokens, merchant ids, currencies, channels) travel
dictionary-encoded, which shrinks events to about half; the reader gets the same schema back.
Importing ``finfeat`` registers the pickler.
"""
from __future__ import annotations

import copyreg

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: schema metadata key: the table's own schema, when some columns travel dictionary-encoded
_PLAIN_SCHEMA = b"finfeat.plain_schema"
#: rows sampled, in runs of _RUN rows evenly spread, to tell whether a string column repeats its values
_SAMPLE, _RUN = 4096, 256


def _repeats(column: pa.ChunkedArray) -> bool:
    """Whether the column holds at most half as many distinct values as rows, estimated from
    the repeats in a spread sample (m sampled rows of N equally likely values repeat about
    m^2 / 2N times). Slices, so the sample copies nothing."""
    n = len(column)
    starts = np.linspace(0, n - _RUN, _SAMPLE // _RUN).astype(np.int64)
    sample = pa.chunked_array([c for s in starts.tolist() for c in column.slice(s, _RUN).chunks], column.type)
    repeats = _SAMPLE - pc.count_distinct(sample, mode="all").as_py()
    return repeats > 0 and _SAMPLE * _SAMPLE / (2 * repeats) <= n / 2


def to_ipc(table: pa.Table) -> bytes:
    """``table`` as IPC stream bytes (see :func:`from_ipc`)."""
    schema = table.schema
    if table.num_rows >= 4 * _SAMPLE:
        encoded = {i for i, f in enumerate(schema) if pa.types.is_string(f.type) and _repeats(table.column(i))}
        if encoded:
            columns = [table.column(i).combine_chunks().dictionary_encode() if i in encoded else table.column(i)
                       for i in range(table.num_columns)]
            fields = [pa.field(f.name, columns[i].type, f.nullable) if i in encoded else f
                      for i, f in enumerate(schema)]
            wire = pa.schema(fields, metadata={_PLAIN_SCHEMA: schema.serialize().to_pybytes()})
            table = pa.Table.from_arrays(columns, schema=wire)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(payload: bytes) -> pa.Table:
    """The table :func:`to_ipc` wrote, with its own schema."""
    table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    plain = (table.schema.metadata or {}).get(_PLAIN_SCHEMA)
    return table if plain is None else table.cast(pa.ipc.read_schema(pa.py_buffer(plain)))


def _table_from_ipc(payload: bytes) -> pa.Table:
    return from_ipc(payload)


def _reduce_table(table: pa.Table) -> tuple[object, tuple[bytes]]:
    return _table_from_ipc, (to_ipc(table),)


def register() -> None:
    copyreg.pickle(pa.Table, _reduce_table)


register()
