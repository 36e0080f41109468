"""Pickle Arrow tables as Arrow IPC streams.

Beam moves our elements (whole Arrow tables) between stages with its pickle-based fallback
coder. Plain pickling of a table read from Parquet or sliced serializes each chunk's whole
parent buffer: an eight-chunk column pickles eight times its size. The IPC stream format
writes only the rows each chunk holds, and is fast. Importing ``finfeat`` registers it.
"""
from __future__ import annotations

import copyreg

import pyarrow as pa


def _table_from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


def _reduce_table(table: pa.Table) -> tuple[object, tuple[bytes]]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return _table_from_ipc, (sink.getvalue().to_pybytes(),)


def register() -> None:
    copyreg.pickle(pa.Table, _reduce_table)


register()
