"""Exact point-in-time feature arithmetic over Arrow tables, vectorized with numpy.

This module is the single implementation of every feature: the batch backfill calls it on
whole key-partitions, the streaming job on an entity's buffered history plus the events
the watermark has passed, and the online lookup on stored state plus one candidate. None
of them re-derives a feature, so training and serving cannot drift apart.

Window rule, for a transaction x of entity e at time t: the W-window holds e's
transactions y with ``(y.event_time, y.txn_id) < (t, x.txn_id)`` (txn ids compared as
byte strings) and ``y.event_time > t - W``. After sorting by ``(entity, event_time,
txn_id)`` that window is the contiguous index range ``[lo(i), i)``, which turns every
aggregate into prefix sums, sparse-table range maxima or short vectorized scans.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.transforms.spec import ENTITY_COLUMNS, FIELD_COLUMNS, FeatureDef, FeatureSpec

EARTH_RADIUS_KM = 6371.0
_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 86_400_000_000
_INT64_MAX = np.iinfo(np.int64).max


class FeatureOverflowError(ArithmeticError):
    """A window sum would not fit in int64 (millions of maximal amounts in one window)."""


def sorted_order(table: pa.Table, key: str, key_codes: np.ndarray | None = None) -> np.ndarray:
    """Row order that groups rows by ``key`` and sorts each group by ``(event_time, txn_id)``.

    Groups come in the order of their dictionary codes (which group comes first changes no
    feature). Sorting by integer codes and times with numpy is much cheaper than Arrow's sort
    on the key's strings; txn ids are compared only within runs of equal ``(key, time)``.
    """
    codes = _codes(table.column(key)) if key_codes is None else key_codes
    t = _numpy(table.column("event_time").cast(pa.int64()))
    order = np.lexsort((t, codes))
    if len(order) < 2:
        return order
    c, ts = codes[order], t[order]
    same = (c[1:] == c[:-1]) & (ts[1:] == ts[:-1])
    if same.any():  # ties on (key, time): order each run by txn id
        tied = np.zeros(len(order), dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        at = np.flatnonzero(tied)
        run = np.cumsum(np.concatenate([[True], ~same]))[at]
        txn = table.column("txn_id").take(pa.array(order[at]))
        within = pc.sort_indices(pa.table({"run": run, "txn": txn}),
                                 sort_keys=[("run", "ascending"), ("txn", "ascending")]).to_numpy()
        order[at] = order[at][within]
    return order


def window_lower_bounds(t: np.ndarray, group: np.ndarray, window: int) -> np.ndarray:
    """For rows sorted by (group, t): the first index in the row's group with t > t_i - window.

    Uses one searchsorted over a composite key ``group * span + t``; groups are processed in
    chunks small enough that the key cannot overflow int64.
    """
    n = len(t)
    if n == 0 or group[-1] == group[0]:  # one group (an online lookup): no composite key needed
        return np.searchsorted(t, t - window, side="right").astype(np.int64, copy=False)
    lo = np.empty(n, dtype=np.int64)
    t0 = int(t.min())
    span = int(t.max()) - t0 + window + 1
    per_chunk = max(1, (_INT64_MAX // 2) // span)
    n_groups = int(group[-1]) + 1
    starts = np.searchsorted(group, np.arange(0, n_groups + per_chunk, per_chunk)[: (n_groups - 1) // per_chunk + 2])
    starts[-1] = n
    for a, b in zip(starts[:-1], starts[1:]):
        if a >= b:
            continue
        g = group[a:b] - group[a]
        key = g * span + (t[a:b] - t0)
        lo[a:b] = a + np.searchsorted(key, key - window, side="right")
    return lo


def group_searchsorted(t: np.ndarray, group: np.ndarray, query_group: np.ndarray,
                       query_t: np.ndarray) -> np.ndarray:
    """For rows sorted by (group, t) and queries sorted by group: the first index of the
    query's group whose t >= query_t (the group's end when there is none)."""
    out = np.empty(len(query_t), dtype=np.int64)
    if len(query_t) == 0:
        return out
    t0, t1 = int(t.min()), int(t.max())
    span = t1 - t0 + 2
    qt = np.clip(query_t, t0, t1 + 1) - t0
    per_chunk = max(1, (_INT64_MAX // 2) // span)
    n_groups = int(group[-1]) + 1
    for g0 in range(0, n_groups, per_chunk):
        g1 = min(g0 + per_chunk, n_groups)
        a, b = np.searchsorted(group, [g0, g1])
        qa, qb = np.searchsorted(query_group, [g0, g1])
        if qa == qb:
            continue
        key = (group[a:b] - g0) * span + (t[a:b] - t0)
        qkey = (query_group[qa:qb] - g0) * span + qt[qa:qb]
        out[qa:qb] = a + np.searchsorted(key, qkey, side="left")
    return out


#: Frames of at most this many rows (an online lookup's) answer range maxima and distinct counts
#: with one rows x rows comparison instead of loops of numpy calls whose fixed cost dominates there.
_SMALL = 64


def _in_range(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Row k, column j: whether lo[k] <= j < hi[k] (small frames only)."""
    j = np.arange(n)
    return (j >= lo[:, None]) & (j < hi[:, None])


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo:hi]) per row for non-empty ranges (0 for empty ones), via a sparse table."""
    length = hi - lo
    if 0 < len(values) <= _SMALL:
        inside = _in_range(len(values), lo, hi)
        return np.where(length > 0, np.where(inside, values, values.min()).max(axis=1), 0).astype(values.dtype,
                                                                                                    copy=False)
    out = np.zeros(len(lo), dtype=values.dtype)
    ok = length > 0
    if not ok.any():
        return out
    levels = [values]
    max_len = int(length.max())
    k = 1
    while (1 << k) <= max_len:
        prev = levels[-1]
        half = 1 << (k - 1)
        levels.append(np.maximum(prev[:-half], prev[half:]) if len(prev) > half else prev[:0])
        k += 1
    lvl = np.zeros(len(lo), dtype=np.int64)
    lvl[ok] = np.floor(np.log2(length[ok])).astype(np.int64)
    # guard against floating log2 off-by-one at exact powers of two
    too_big = ok & ((1 << lvl) > length)
    lvl[too_big] -= 1
    for k in np.unique(lvl[ok]):
        rows = ok & (lvl == k)
        table = levels[k]
        out[rows] = np.maximum(table[lo[rows]], table[hi[rows] - (1 << k)])
    return out


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(lon2) - np.radians(lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(a))


def _numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else values.to_numpy()


def _codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Dictionary codes of a column: equal values, equal codes (within one call)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pc.dictionary_encode(values).indices.to_numpy(zero_copy_only=False)


def _previous_same(group: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Index of the previous row (in sorted order) with the same group and code, else -1."""
    n = len(group)
    pos = np.arange(n)
    order = np.lexsort((pos, codes, group))
    prev = np.full(n, -1, dtype=np.int64)
    if n > 1:
        same = (group[order[1:]] == group[order[:-1]]) & (codes[order[1:]] == codes[order[:-1]])
        prev[order[1:][same]] = order[:-1][same]
    return prev


class _EntityFrame:
    """Events sorted by (entity, event_time, txn_id), with shared intermediate arrays.

    Two sources feed it: an Arrow table (:class:`_TableFrame`, the batch and streaming paths)
    or numpy columns already in that order (:class:`_ArrayFrame`, the online lookup, whose few
    dozen rows make Arrow's per-call cost dominate). They differ only in how a column is
    loaded (the ``_load_*`` methods); every derived array, and :func:`_compute_one` on top of
    them, is the same code, so every path runs the same arithmetic.
    """

    order: np.ndarray | None = None  # the input row of each sorted row (table frames)

    def __init__(self, group: np.ndarray, t: np.ndarray, at: np.ndarray | None = None) -> None:
        self.group = group
        self.t = t
        self.n = len(t)
        self.idx = np.arange(self.n, dtype=np.int64)
        # the rows whose features are wanted (sorted, distinct): every row unless given. Window
        # bounds and aggregates are evaluated at these rows only; what is shared by every row
        # (prefix sums, previous occurrences) is a linear pass over the frame.
        self.at = self.idx if at is None else np.asarray(at, dtype=np.int64)
        self.every_row = at is None
        self.everywhere = np.ones(len(self.at), dtype=bool)  # validity of always-valid features (read-only)
        self.every_valid = self.everywhere if self.every_row else np.ones(self.n, dtype=bool)  # of columns
        self._lo: dict[int, np.ndarray] = {}
        self._cache: dict[str, Any] = {}

    @property
    def gstart(self) -> np.ndarray:
        """The first row of each row's group."""
        if "gstart" not in self._cache:
            new = np.ones(self.n, dtype=bool)
            if self.n > 1:
                np.not_equal(self.group[1:], self.group[:-1], out=new[1:])
            self._cache["gstart"] = np.maximum.accumulate(np.where(new, self.idx, 0)) if self.n else self.idx
        return self._cache["gstart"]

    # -- loading a column, in sorted order (per source) ----------------------------------------

    def _load_ints(self, column: str) -> np.ndarray:
        raise NotImplementedError

    def _load_floats(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Values with nulls as 0.0, and validity."""
        raise NotImplementedError

    def _load_codes(self, column: str) -> np.ndarray:
        raise NotImplementedError

    def _load_flags(self, column: str) -> np.ndarray:
        """Booleans with nulls as False."""
        raise NotImplementedError

    def _load_times(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Microseconds and validity, or None when the column is absent."""
        raise NotImplementedError

    def _cached(self, key: str, load: Callable[[str], Any], column: str) -> Any:
        if key not in self._cache:
            self._cache[key] = load(column)
        return self._cache[key]

    # -- shared accessors ---------------------------------------------------------------------

    def ints(self, column: str) -> np.ndarray:
        return self._cached(f"ints:{column}", self._load_ints, column)

    def floats(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Values (nulls as 0.0) and validity, in sorted order."""
        return self._cached(f"floats:{column}", self._load_floats, column)

    def codes(self, column: str) -> np.ndarray:
        """Equal values, equal codes."""
        return self._cached(f"codes:{column}", self._load_codes, column)

    def flags(self, column: str) -> np.ndarray:
        """A boolean column with nulls as False, in sorted order."""
        return self._cached(f"flags:{column}", self._load_flags, column)

    def optional_times(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A timestamp column as int64 microseconds and its validity, or None when absent."""
        return self._cached(f"times:{column}", self._load_times, column)

    def lo(self, window: int) -> np.ndarray:
        """The first row of each wanted row's window (aligned with :attr:`at`)."""
        if window not in self._lo:
            if self.every_row:
                self._lo[window] = window_lower_bounds(self.t, self.group, window)
            else:  # y.t > t - window, i.e. y.t >= t - window + 1 (integer microseconds)
                at = self.at
                self._lo[window] = group_searchsorted(self.t, self.group, self.group[at], self.t[at] - window + 1)
        return self._lo[window]

    def count(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Events in each wanted row's window, and whether there are any (shared: read-only)."""
        key = f"count:{window}"
        if key not in self._cache:
            count = self.at - self.lo(window)
            self._cache[key] = (count, count > 0)
        return self._cache[key]

    def prefix(self, column: str) -> np.ndarray:
        """Prefix sums in int64. They may wrap around on a long partition, which is harmless:
        numpy's int64 arithmetic is modulo 2**64, so a difference of two prefix sums is the
        window's sum modulo 2**64, which is the sum itself whenever it lies in [0, 2**63).
        Read window sums through :meth:`window_sum`, which guarantees that."""
        key = f"prefix:{column}"
        if key not in self._cache:
            self._cache[key] = np.concatenate([[0], np.cumsum(self.ints(column))])
        return self._cache[key]

    def window_sum(self, column: str, window: int) -> np.ndarray:
        """Sum of a non-negative integer column over each wanted row's window, exact in int64.

        Every value is in [0, biggest], so a window of k events sums to at most k * biggest;
        when that is below 2**63 for the fullest window, the prefix-sum difference is exact (see
        :meth:`prefix`). Amounts are bounded at parse (``MAX_AMOUNT_MINOR`` = 10**12), so this
        holds for any window of fewer than 9,223,372 events; past that, the rows that could
        overflow are summed in Python integers and a sum beyond int64 raises
        :class:`FeatureOverflowError` instead of wrapping.
        """
        key = f"wsum:{column}:{window}"
        if key not in self._cache:
            x = self.ints(column)
            count, _ = self.count(window)
            p = self.prefix(column)
            total = p[self.at] - p[self.lo(window)]
            if self.n:
                low, biggest = int(x.min()), int(x.max())
                if low < 0:
                    raise FeatureOverflowError(f"{column} holds a negative value ({low}); window sums expect "
                                               "amounts validated at parse (0 to MAX_AMOUNT_MINOR)")
                risky = np.flatnonzero(count.astype(np.float64) * biggest >= 2.0**63)
                if risky.size:
                    lo = self.lo(window)
                    exact = [sum(x[a:b].tolist()) for a, b in zip(lo[risky], self.at[risky])]
                    if max(exact) > _INT64_MAX:
                        raise FeatureOverflowError(f"a {column} window sum exceeds int64 ({max(exact)})")
                    total[risky] = exact
            self._cache[key] = total
        return self._cache[key]

    def prev_same(self, column: str) -> np.ndarray:
        key = f"prev:{column}"
        if key not in self._cache:
            self._cache[key] = _previous_same(self.group, self.codes(column))
        return self._cache[key]

    def square_prefix(self, column: str) -> np.ndarray:
        """Prefix sums of x*x: int64 when no window sum can overflow it, exact Python ints otherwise."""
        key = f"square:{column}"
        if key not in self._cache:
            x = self.ints(column)
            biggest = int(np.abs(x).max()) if self.n else 0
            if biggest * biggest * max(self.n, 1) < (1 << 62):
                self._cache[key] = np.concatenate([[0], np.cumsum(x * x)])
            else:
                xo = x.astype(object)
                self._cache[key] = np.concatenate([np.array([0], dtype=object), np.cumsum(xo * xo)])
        return self._cache[key]


class _TableFrame(_EntityFrame):
    """A frame over an Arrow table in any row order; columns are read once, sorted with numpy."""

    def __init__(self, table: pa.Table, entity: str) -> None:
        codes = _codes(table.column(ENTITY_COLUMNS[entity]))
        order = sorted_order(table, ENTITY_COLUMNS[entity], codes)
        key_codes = codes[order]
        new_group = np.ones(len(order), dtype=bool)
        if len(order) > 1:
            np.not_equal(key_codes[1:], key_codes[:-1], out=new_group[1:])
        super().__init__(np.cumsum(new_group) - 1, _numpy(table.column("event_time").cast(pa.int64()))[order])
        self.table, self.order = table, order

    def _load_ints(self, column: str) -> np.ndarray:
        return _numpy(self.table.column(column)).astype(np.int64)[self.order]

    def _load_floats(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        col = self.table.column(column)
        return _numpy(col.fill_null(0.0)).astype(np.float64)[self.order], _numpy(col.is_valid())[self.order]

    def _load_codes(self, column: str) -> np.ndarray:
        return _codes(self.table.column(column))[self.order]

    def _load_flags(self, column: str) -> np.ndarray:
        return self.table.column(column).take(self.order).fill_null(False).to_numpy(zero_copy_only=False)

    def _load_times(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        if column not in self.table.column_names:
            return None
        given = self.table.column(column).take(self.order).cast(pa.int64())
        return given.fill_null(0).to_numpy(zero_copy_only=False), given.is_valid().to_numpy(zero_copy_only=False)


class _ArrayFrame(_EntityFrame):
    """A frame over numpy columns already sorted by (group, t, txn_id); ``group`` int64 from 0
    without gaps. ``columns``: name -> (values, validity or None when all valid), in that row
    order; integers as int64, coordinates as float64 (any value where invalid), booleans as
    bool, timestamps as int64 microseconds, and text as integer codes (equal text, equal code)."""

    def __init__(self, group: np.ndarray, t: np.ndarray,
                 columns: dict[str, tuple[np.ndarray, np.ndarray | None]], at: np.ndarray | None = None) -> None:
        super().__init__(group, t, at)
        self.columns = columns

    def _valid(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        values, valid = self.columns[column]
        return values, self.every_valid if valid is None else valid

    def _load_ints(self, column: str) -> np.ndarray:
        return self.columns[column][0]

    def _load_floats(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        values, valid = self._valid(column)
        return np.where(valid, values, 0.0), valid

    def _load_codes(self, column: str) -> np.ndarray:
        return self.columns[column][0]

    def _load_flags(self, column: str) -> np.ndarray:
        values, valid = self._valid(column)
        return values & valid

    def _load_times(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self._valid(column) if column in self.columns else None


def _masked(values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.array(values, type=typ, mask=~valid)


def _window_std(frame: _EntityFrame, col: str, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample standard deviation of ``col`` over each row's window, and where it is defined
    (two or more values that are not all equal); shared by std and zscore (read-only)."""
    key = f"std:{col}:{window}"
    if key in frame._cache:
        return frame._cache[key]
    i, n = frame.at, len(frame.at)
    lo = frame.lo(window)
    count, _ = frame.count(window)
    # Exact integer sums of the window, then n*S2 - S1^2 in Python integers (exact, and a
    # function of the window's values alone, so every run and every path agrees bit for bit).
    q = frame.square_prefix(col)
    varies = count >= 2
    rows = np.flatnonzero(varies)
    s1, s2, k = frame.window_sum(col, window)[rows], q[i[rows]] - q[lo[rows]], count[rows]
    if s2.dtype != object and (k.astype(np.float64) * s2.astype(np.float64)).max(initial=0) < 2.0**62:
        numerator = k * s2 - s1 * s1  # exact in int64
        denominator = k * (k - 1)
        # float division of two exactly representable integers is correctly rounded, like
        # Python's int / int below; beyond 2**53 only the latter is, so those rows take it.
        ratio = numerator.astype(np.float64) / denominator.astype(np.float64)
        big = np.flatnonzero((np.abs(numerator) >= 2**53) | (denominator >= 2**53))
        ratio[big] = [int(a) / int(b) for a, b in zip(numerator[big], denominator[big])]
    else:
        s1, s2, k = s1.astype(object), s2.astype(object), k.astype(object)
        numerator = k * s2 - s1 * s1
        ratio = np.array([a / b for a, b in zip(numerator, k * (k - 1))], dtype=np.float64)
    varies[rows[numerator == 0]] = False
    std = np.zeros(n)
    std[rows] = np.sqrt(ratio)
    frame._cache[key] = (std, varies)
    return std, varies


def _compute_one(frame: _EntityFrame, f: FeatureDef) -> tuple[np.ndarray, np.ndarray]:
    """Values and validity of one feature at the frame's wanted rows (:attr:`_EntityFrame.at`)."""
    i = frame.at
    n = len(i)
    everywhere = frame.everywhere
    agg = f.agg
    if agg in {"count", "sum", "avg", "max", "min", "std", "zscore", "distinct", "is_new"}:
        lo = frame.lo(f.window_us)
        count, nonempty = frame.count(f.window_us)
    if agg == "count":
        return count, everywhere
    if agg in {"sum", "avg"}:
        total = frame.window_sum(FIELD_COLUMNS[f.field], f.window_us)
        if agg == "sum":
            return total, everywhere
        return total / np.maximum(count, 1), nonempty
    if agg in {"max", "min"}:
        x = frame.ints(FIELD_COLUMNS[f.field])
        if not frame.every_row and n:  # only the rows some window reaches
            first = int(lo.min())
            x, lo, i = x[first:int(i.max())], lo - first, i - first
        if agg == "max":
            return _range_max(x, lo, i), nonempty
        return -_range_max(-x, lo, i), nonempty
    if agg in {"std", "zscore"}:
        col = FIELD_COLUMNS[f.field]
        std, varies = _window_std(frame, col, f.window_us)
        if agg == "std":
            return std, varies
        x = frame.ints(col)[i]
        avg = frame.window_sum(col, f.window_us) / np.maximum(count, 1)
        z = np.zeros(n)
        z[varies] = (x[varies] - avg[varies]) / std[varies]
        return z, varies
    if agg == "distinct":
        prev = frame.prev_same(FIELD_COLUMNS[f.field])
        if frame.n <= _SMALL:  # values in [lo, i) whose previous occurrence is before lo: each counted once
            return (_in_range(frame.n, lo, i) & (prev < lo[:, None])).sum(axis=1), everywhere
        distinct = np.zeros(n, dtype=np.int64)
        active = np.flatnonzero(count > 0)
        k = 1
        while active.size:
            j = i[active] - k
            distinct[active] += prev[j] < lo[active]
            k += 1
            active = active[count[active] >= k]
        return distinct, everywhere
    if agg == "is_new":
        prev = frame.prev_same(FIELD_COLUMNS[f.field])
        return prev[i] < lo, everywhere
    if agg == "seconds_since_last":
        has_prev = i > frame.gstart[i]
        dt = np.zeros(n)
        dt[has_prev] = (frame.t[i[has_prev]] - frame.t[i[has_prev] - 1]) / 1e6
        return dt, has_prev
    if agg == "geo_velocity":
        lat, lat_ok = frame.floats("merchant_lat")
        lon, lon_ok = frame.floats("merchant_lon")
        located = lat_ok & lon_ok
        last = np.maximum.accumulate(np.where(located, frame.idx, -1)) if frame.n else frame.idx
        prev = np.where(i > 0, last[np.maximum(i - 1, 0)], -1)  # the newest located row before each
        ok = located[i] & (prev >= frame.gstart[i])
        p = np.where(ok, prev, 0)
        dt = frame.t[i] - frame.t[p]
        ok &= dt > 0
        speed = np.zeros(n)
        if ok.any():
            q = i[ok]
            dist = haversine_km(lat[p[ok]], lon[p[ok]], lat[q], lon[q])
            speed[ok] = dist / (dt[ok] / _US_PER_HOUR)
        return speed, ok
    if agg == "fraud_rate":
        return _fraud_rate(frame, f)
    raise ValueError(f"aggregation {agg!r} is not computed per entity")


def _fraud_rate(frame: _EntityFrame, f: FeatureDef) -> tuple[np.ndarray, np.ndarray]:
    """Share of the entity's transactions in (t - delay - W, t - delay] whose fraud label was
    known before t. A label's time is its ``label_time`` where the table has one, else the
    event time plus the delay (a label counts as known ``delay`` after its transaction)."""
    window, delay = f.window_us, f.delay_us
    first = frame.lo(delay + window)
    after = frame.lo(delay)
    count = after - first
    fraud = frame.flags("is_fraud")
    label_time = frame.t + delay
    given = frame.optional_times("label_time")
    if given is not None:
        label_time = np.where(given[1], given[0], label_time)
    j = np.flatnonzero(fraud)
    # fraud j counts for rows whose t lies in [max(t_j + delay, label_j + 1), t_j + delay + W)
    start = group_searchsorted(frame.t, frame.group, frame.group[j], np.maximum(frame.t[j] + delay, label_time[j] + 1))
    stop = group_searchsorted(frame.t, frame.group, frame.group[j], frame.t[j] + delay + window)
    diff = np.zeros(frame.n + 1, dtype=np.int64)
    keep = stop > start
    np.add.at(diff, start[keep], 1)
    np.add.at(diff, stop[keep], -1)
    frauds = np.cumsum(diff)[frame.at]
    rate = frauds / np.maximum(count, 1)
    return rate, count > 0


def history_tail(table: pa.Table, entity: str) -> np.ndarray:
    """Row indices of each entity's newest event and newest located event (merchant coordinates,
    when the table has them).

    Features without a window (seconds since the last event, geo velocity) reach back to these
    however old they are, so a job that trims history to the windows keeps them too.
    """
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    frame = _TableFrame(table, entity)
    last = np.ones(frame.n, dtype=bool)
    last[:-1] = frame.group[1:] != frame.group[:-1]
    if {"merchant_lat", "merchant_lon"} <= set(table.column_names):
        located = np.flatnonzero(frame.floats("merchant_lat")[1] & frame.floats("merchant_lon")[1])
    else:  # a table kept without coordinates (no geo velocity to compute) has no located event
        located = np.zeros(0, dtype=np.int64)
    if located.size:
        g = frame.group[located]
        last_located = located[np.append(g[1:] != g[:-1], True)]
    else:
        last_located = located
    keep = np.union1d(np.flatnonzero(last), last_located)
    return np.sort(frame.order[keep])


UNBOUNDED_AGGS = frozenset({"seconds_since_last", "geo_velocity"})


def frame_fields(defs: Sequence[FeatureDef], available: Sequence[str]) -> list[str]:
    """The event columns (of ``available``) that these features read, besides the entity key and
    event time: what an array frame (:func:`compute_sorted_entity_features`) needs."""
    needed: set[str] = set()
    for f in defs:
        if f.field:
            needed.add(FIELD_COLUMNS[f.field])
        if f.agg == "geo_velocity":
            needed.update(("merchant_lat", "merchant_lon"))
        if f.agg == "fraud_rate":
            needed.update(("is_fraud", "label_time"))
    return [name for name in available if name in needed]


def compute_entity_features(
    table: pa.Table, defs: Sequence[FeatureDef], entity: str
) -> dict[str, pa.Array]:
    """Features of one entity kind for every row of ``table``, aligned with its row order.

    ``table`` holds canonical events (at least txn_id, event_time, the entity column and the
    fields the definitions read) for any number of entities: the whole history that the
    windows may reach. Rows are not required to be sorted.
    """
    frame = _TableFrame(table, entity)
    inverse = np.empty(frame.n, dtype=np.int64)
    inverse[frame.order] = np.arange(frame.n)
    result: dict[str, pa.Array] = {}
    for f in defs:
        values, valid = _compute_one(frame, f)
        values, valid = values[inverse], valid[inverse]
        result[f.name] = _masked(values, valid, f.arrow_type)
    return result


def calendar_values(t_us: np.ndarray) -> dict[str, np.ndarray]:
    """hour_of_day, day_of_week (Monday = 0) and is_weekend of UTC event times in microseconds."""
    days = t_us // _US_PER_DAY
    dow = (days + 3) % 7  # 1970-01-01 was a Thursday
    return {
        "hour_of_day": ((t_us // _US_PER_HOUR) % 24).astype(np.int32),
        "day_of_week": dow.astype(np.int32),
        "is_weekend": dow >= 5,
    }


def compute_calendar_features(table: pa.Table, defs: Sequence[FeatureDef]) -> dict[str, pa.Array]:
    """hour_of_day, day_of_week (Monday = 0) and is_weekend of each row's UTC event time."""
    values = calendar_values(table.column("event_time").cast(pa.int64()).to_numpy())
    return {f.name: pa.array(values[f.agg], type=f.arrow_type) for f in defs}


def compute_sorted_entity_features(
    group: np.ndarray, t: np.ndarray, columns: dict[str, tuple[np.ndarray, np.ndarray | None]],
    defs: Sequence[FeatureDef], rows: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features of one entity kind at ``rows``, for events given as numpy columns already
    sorted by (entity, event_time, txn_id): ``group`` numbers the entities 0, 1, ... in that
    order, ``t`` is event time in microseconds, ``columns`` as :class:`_ArrayFrame` takes them.

    The same arithmetic as :func:`compute_entity_features` without Arrow's per-call cost (online
    lookups, point-in-time joins, the stream's flushes), evaluated at ``rows`` only: window bounds
    are binary searches from those rows, so the cost is a few linear passes over the frame (prefix
    sums) plus the work of the wanted rows. Returns name -> (values, validity) at ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():  # the frame wants sorted, distinct rows
        at, back = np.unique(rows, return_inverse=True)
    else:
        at, back = rows, None
    frame = _ArrayFrame(group, t, columns, at=at)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in defs:
        values, valid = _compute_one(frame, f)
        out[f.name] = (values, valid) if back is None else (values[back], valid[back])
    return out


def compute_features(table: pa.Table, spec: FeatureSpec) -> pa.Table:
    """Every feature of ``spec`` for every row of ``table`` (all the entities it needs).

    The result is ``txn_id`` plus the feature columns in spec order, aligned with the input.
    Callers that split entities across workers call :func:`compute_entity_features` per
    entity instead and join on ``txn_id``.
    """
    cols: dict[str, pa.Array] = {}
    for entity in spec.entities:
        cols.update(compute_entity_features(table, spec.for_entity(entity), entity))
    cols.update(compute_calendar_features(table, spec.for_entity("event")))
    arrays = [table.column("txn_id").combine_chunks()] + [cols[name] for name in spec.names]
    return pa.Table.from_arrays(arrays, names=["txn_id", *spec.names])
