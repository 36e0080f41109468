"""Arrow tables between Beam stages: the coder and the pickler give back the same table."""
from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from finfeat.pipelines.coders import ArrowTableCoder
from finfeat.schemas.arrow_pickle import from_ipc, to_ipc


def _table(n: int) -> pa.Table:
    schema = pa.schema([pa.field("txn_id", pa.string(), nullable=False), pa.field("card", pa.string()),
                        pa.field("currency", pa.string(), nullable=False), pa.field("amount", pa.int64())],
                       metadata={b"origin": b"test"})
    part = n // 2
    chunks = [pa.table({"txn_id": [f"t{i:08d}" for i in range(lo, hi)],
                        "card": [None if i % 7 == 0 else f"tok_{i % 300:032d}" for i in range(lo, hi)],
                        "currency": ["USD" if i % 3 else "EUR" for i in range(lo, hi)],
                        "amount": list(range(lo, hi))}, schema=schema) for lo, hi in ((0, part), (part, n))]
    return pa.concat_tables(chunks)


@pytest.mark.parametrize("n", [10, 50_000])
def test_round_trip_keeps_values_and_schema(n: int) -> None:
    table = _table(n)
    for back in (from_ipc(to_ipc(table)), ArrowTableCoder().decode(ArrowTableCoder().encode(table)),
                 pickle.loads(pickle.dumps(table))):
        assert back.schema == table.schema and back.schema.metadata == table.schema.metadata
        assert back.equals(table)


def test_repeated_strings_travel_smaller_and_unique_ones_as_they_are() -> None:
    table = _table(50_000)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    plain = len(sink.getvalue().to_pybytes())
    assert len(to_ipc(table)) < 0.75 * plain
    wire = pa.ipc.open_stream(pa.py_buffer(to_ipc(table))).read_all().schema
    assert [pa.types.is_dictionary(f.type) for f in wire] == [False, True, True, False]
