"""Population stability index (PSI) per feature, between a reference and a current table.

For each column: bins are the reference's deciles (quantile edges of its non-null values,
duplicates merged, so a mostly-zero count has fewer bins), nulls are a bin of their own,
booleans are two bins (plus nulls). With ``r_i`` and ``c_i`` the share of reference and current
rows in bin ``i`` (an empty bin counts as ``eps``)::

    PSI = sum_i (c_i - r_i) * ln(c_i / r_i)

Identical distributions give 0. The usual reading: below 0.1 stable, 0.1 to 0.25 a shift worth a
look, above 0.25 a real shift.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_BINS = 10
EPSILON = 1e-4

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class DriftResult:
    column: str
    psi: float
    status: Status
    bins: int                 # bins used, the null bin included
    reference_rows: int
    current_rows: int


def _values(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(non-null values as float64, null mask incl. NaN) of a numeric column."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    null = arr.is_null().to_numpy(zero_copy_only=False) | np.isnan(values)
    return values, null


def bin_counts(reference: pa.ChunkedArray | pa.Array, current: pa.ChunkedArray | pa.Array,
               bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Row counts per bin (the last bin holds the nulls) of the reference and the current column."""
    if pa.types.is_boolean(reference.type):
        ref_v, ref_null = _values(pc.cast(reference, pa.int8()))
        cur_v, cur_null = _values(pc.cast(current, pa.int8()))
        edges = np.array([0.5])
    else:
        ref_v, ref_null = _values(reference)
        cur_v, cur_null = _values(current)
        ref_ok = ref_v[~ref_null]
        if ref_ok.size:
            qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
            edges = np.unique(np.quantile(ref_ok, qs))
        else:
            edges = np.array([])
    k = len(edges) + 1

    def count(values: np.ndarray, null: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(edges, values[~null], side="left")   # right-closed bins: (e_{i-1}, e_i]
        out = np.bincount(idx, minlength=k).astype(np.float64)
        return np.append(out, float(null.sum()))

    return count(ref_v, ref_null), count(cur_v, cur_null)


def psi(reference: pa.ChunkedArray | pa.Array, current: pa.ChunkedArray | pa.Array, *,
        bins: int = DEFAULT_BINS, eps: float = EPSILON) -> float:
    """The PSI of ``current`` against ``reference`` (numeric or boolean columns)."""
    return _psi(*bin_counts(reference, current, bins), eps)


def _psi(ref: np.ndarray, cur: np.ndarray, eps: float) -> float:
    if ref.sum() == 0 or cur.sum() == 0:
        raise ValueError("PSI needs rows on both sides")
    r = np.maximum(ref / ref.sum(), eps)
    c = np.maximum(cur / cur.sum(), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def drift_columns(reference: pa.Table, current: pa.Table, preferred: Sequence[str] | None = None) -> list[str]:
    """The columns to compare: ``preferred`` (e.g. the spec's feature names) present in both tables,
    or, without ``preferred``, every numeric or boolean column the two share."""
    shared = [n for n in current.column_names if n in reference.column_names]
    if preferred is not None:
        return [n for n in preferred if n in shared]

    def numeric(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    return [n for n in shared if numeric(current.schema.field(n).type) and numeric(reference.schema.field(n).type)]


def drift_report(reference: pa.Table, current: pa.Table, columns: Sequence[str], *, warn: float = 0.1,
                 fail: float = 0.25, bins: int = DEFAULT_BINS, eps: float = EPSILON) -> list[DriftResult]:
    """PSI and a status (``ok`` below ``warn``, ``warn``, ``fail`` at or above ``fail``) per column."""
    if reference.num_rows == 0 or current.num_rows == 0:
        raise ValueError(f"PSI needs rows on both sides (reference {reference.num_rows}, current {current.num_rows})")
    out = []
    for name in columns:
        ref, cur = bin_counts(reference.column(name), current.column(name), bins)
        value = _psi(ref, cur, eps)
        status: Status = "fail" if value >= fail else "warn" if value >= warn else "ok"
        out.append(DriftResult(column=name, psi=round(value, 6), status=status, bins=len(ref),
                               reference_rows=reference.num_rows, current_rows=current.num_rows))
    return out
