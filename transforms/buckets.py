"""Stable hash partitioning of string keys, identical on every worker and machine."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (nulls hash as the empty string)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    arr = values.cast(pa.large_binary()).fill_null(b"")
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    with np.errstate(over="ignore"):
        for pos in range(int(lengths.max()) if n else 0):
            active = np.flatnonzero(lengths > pos)
            h[active] = (h[active] ^ data[starts[active] + pos].astype(np.uint64)) * _FNV_PRIME
    return h


def bucket_of(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    return (stable_hash(values) % np.uint64(buckets)).astype(np.int64)


def split_by_bucket(table: pa.Table, column: str, buckets: int) -> list[tuple[int, pa.Table]]:
    """``table`` cut into per-bucket pieces (empty buckets omitted)."""
    if table.num_rows == 0:
        return []
    b = bucket_of(table.column(column), buckets)
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    cuts = np.flatnonzero(np.diff(sorted_b)) + 1
    bounds = np.concatenate([[0], cuts, [len(b)]])
    taken = table.take(pa.array(order))
    return [(int(sorted_b[s]), taken.slice(s, e - s)) for s, e in zip(bounds[:-1], bounds[1:])]
