"""A Beam coder for Arrow tables: IPC stream bytes (:mod:`finfeat.schemas.arrow_pickle`), and a
size estimate that costs nothing.

Beam samples element sizes for its metrics by encoding elements (always the first ten of
every step). Our elements are whole tables, few and large, so without this coder every one
of them would be pickled once more just to be measured. Importing this module registers
the coder for ``pyarrow.Table``; steps that declare ``pa.Table`` (or ``tuple[int, pa.Table]``)
outputs use it.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from finfeat.schemas.arrow_pickle import from_ipc, to_ipc


class ArrowTableCoder(beam.coders.Coder):
    def encode(self, table: pa.Table) -> bytes:
        return to_ipc(table)

    def decode(self, payload: bytes) -> pa.Table:
        return from_ipc(payload)

    def estimate_size(self, table: pa.Table) -> int:
        return table.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return pa.Table

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)
