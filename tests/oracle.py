"""Independent test oracle for the card-fraud point-in-time features.

The production features are computed by a vectorised numpy engine; this module computes the
same feature set from the written contract alone, with one plain DuckDB SQL query built on
self-joins, so that the two implementations share nothing but the spec. It is meant to be
*obviously* correct, not fast: every window is literally "the rows ``y`` of the same entity
that come before ``x`` in (event_time, txn_id) order and are less than ``W`` old".

Contract (summarised; the spec is the authority):

* For a transaction ``x`` of card ``c`` at time ``t`` the W-window holds ``c``'s transactions
  ``y`` with ``(y.event_time, y.txn_id) < (t, x.txn_id)`` (txn ids compared as strings, byte
  order) and ``y.event_time > t - W``. ``x`` is never in its own window.
* Counts and sums of an empty window are 0. Average/maximum/std of an empty window, std of a
  single value, a zero std (all values equal), no (located) previous transaction, zero elapsed
  time for velocity and ``x`` itself having no location are NULL; never NaN, never a made-up 0.
* Times are compared as integer microseconds since the Unix epoch (UTC), so 1h = 3 600 s,
  24h = 86 400 s, 7d and 30d are exact and never calendar or DST dependent.

Public API: :data:`FEATURE_COLUMNS`, :func:`oracle_features`, :func:`compare_features`.
"""
from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FEATURE_COLUMNS", "FEATURE_TYPES", "oracle_features", "compare_features"]

#: Output feature columns, in contract order (the oracle's table has ``txn_id`` first).
FEATURE_COLUMNS: list[str] = [
    "card_count_1h",
    "card_count_24h",
    "card_count_7d",
    "card_count_30d",
    "card_sum_amount_1h",
    "card_sum_amount_24h",
    "card_sum_amount_7d",
    "card_sum_amount_30d",
    "card_avg_amount_7d",
    "card_avg_amount_30d",
    "card_max_amount_24h",
    "card_std_amount_30d",
    "card_amount_zscore_30d",
    "card_distinct_merchants_24h",
    "card_seconds_since_last",
    "card_is_new_merchant_30d",
    "card_geo_velocity_kmh",
    "merchant_count_1h",
    "merchant_count_24h",
    "merchant_count_7d",
    "hour_of_day",
    "day_of_week",
    "is_weekend",
]

_I64, _F64, _I32, _BOOL = pa.int64(), pa.float64(), pa.int32(), pa.bool_()

#: Arrow type of every feature column.
FEATURE_TYPES: dict[str, pa.DataType] = {
    **{f"card_count_{w}": _I64 for w in ("1h", "24h", "7d", "30d")},
    **{f"card_sum_amount_{w}": _I64 for w in ("1h", "24h", "7d", "30d")},
    "card_avg_amount_7d": _F64,
    "card_avg_amount_30d": _F64,
    "card_max_amount_24h": _I64,
    "card_std_amount_30d": _F64,
    "card_amount_zscore_30d": _F64,
    "card_distinct_merchants_24h": _I64,
    "card_seconds_since_last": _F64,
    "card_is_new_merchant_30d": _BOOL,
    "card_geo_velocity_kmh": _F64,
    **{f"merchant_count_{w}": _I64 for w in ("1h", "24h", "7d")},
    "hour_of_day": _I32,
    "day_of_week": _I32,
    "is_weekend": _BOOL,
}
assert list(FEATURE_TYPES) == FEATURE_COLUMNS

# Window lengths in microseconds.
_H1 = 3_600 * 1_000_000
_H24 = 86_400 * 1_000_000
_D7 = 7 * _H24
_D30 = 30 * _H24

# ``y`` comes strictly before ``x`` in (event_time, txn_id) order.
_BEFORE = "(y.t < x.t OR (y.t = x.t AND y.txn_id < x.txn_id))"

ORACLE_SQL = f"""
WITH ev AS (
    -- t: event time as integer microseconds since the epoch (UTC).
    SELECT txn_id, card_token, merchant_id,
           amount_minor AS amount,
           epoch_us(event_time) AS t,
           event_time AT TIME ZONE 'UTC' AS utc_time,          -- naive UTC wall-clock time
           merchant_lat AS lat, merchant_lon AS lon,
           (merchant_lat IS NOT NULL AND merchant_lon IS NOT NULL) AS located
    FROM events
),

-- Card windows: every earlier transaction of the same card less than 30 days old, then one
-- FILTER per window length.
card_windows AS (
    SELECT
        x.txn_id,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_H1})  AS card_count_1h,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_H24}) AS card_count_24h,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_D7})  AS card_count_7d,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_D30}) AS card_count_30d,
        coalesce(sum(y.amount) FILTER (WHERE y.t > x.t - {_H1}), 0)::BIGINT  AS card_sum_amount_1h,
        coalesce(sum(y.amount) FILTER (WHERE y.t > x.t - {_H24}), 0)::BIGINT AS card_sum_amount_24h,
        coalesce(sum(y.amount) FILTER (WHERE y.t > x.t - {_D7}), 0)::BIGINT  AS card_sum_amount_7d,
        coalesce(sum(y.amount) FILTER (WHERE y.t > x.t - {_D30}), 0)::BIGINT AS card_sum_amount_30d,
        avg(y.amount) FILTER (WHERE y.t > x.t - {_D7})  AS card_avg_amount_7d,
        avg(y.amount) FILTER (WHERE y.t > x.t - {_D30}) AS card_avg_amount_30d,
        max(y.amount) FILTER (WHERE y.t > x.t - {_H24}) AS card_max_amount_24h,
        -- sample std; NULL for 0 or 1 values and when every value is equal (max = min)
        CASE WHEN max(y.amount) FILTER (WHERE y.t > x.t - {_D30})
                > min(y.amount) FILTER (WHERE y.t > x.t - {_D30})
             THEN stddev_samp(y.amount) FILTER (WHERE y.t > x.t - {_D30})
        END AS card_std_amount_30d,
        count(DISTINCT y.merchant_id) FILTER (WHERE y.t > x.t - {_H24}) AS card_distinct_merchants_24h,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_D30} AND y.merchant_id = x.merchant_id) = 0
            AS card_is_new_merchant_30d
    FROM ev x
    LEFT JOIN ev y
      ON y.card_token = x.card_token
     AND {_BEFORE}
     AND y.t > x.t - {_D30}
    GROUP BY x.txn_id
),

-- Merchant windows: the same rule with merchant_id as the entity.
merchant_windows AS (
    SELECT
        x.txn_id,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_H1})  AS merchant_count_1h,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_H24}) AS merchant_count_24h,
        count(y.txn_id) FILTER (WHERE y.t > x.t - {_D7})  AS merchant_count_7d
    FROM ev x
    LEFT JOIN ev y
      ON y.merchant_id = x.merchant_id
     AND {_BEFORE}
     AND y.t > x.t - {_D7}
    GROUP BY x.txn_id
),

-- The card's previous transaction in (time, txn_id) order, no window bound: it is the
-- earlier transaction with the latest time, so only that time is needed.
previous AS (
    SELECT x.txn_id, max(y.t) AS prev_t
    FROM ev x
    JOIN ev y
      ON y.card_token = x.card_token
     AND {_BEFORE}
    GROUP BY x.txn_id
),

-- The card's latest earlier transaction (in (time, txn_id) order) that has a location.
located_previous AS (
    SELECT x.txn_id, y.t AS prev_t, y.lat AS prev_lat, y.lon AS prev_lon
    FROM ev x
    JOIN ev y
      ON y.card_token = x.card_token
     AND {_BEFORE}
     AND y.located
    QUALIFY row_number() OVER (PARTITION BY x.txn_id ORDER BY y.t DESC, y.txn_id DESC) = 1
),

-- Haversine distance (km, R = 6371) from the located previous transaction to x.
velocity AS (
    SELECT x.txn_id,
           x.t - lp.prev_t AS elapsed_us,
           2 * 6371.0 * asin(least(1.0, sqrt(   -- least(): guards rounding above 1 only
               pow(sin((radians(x.lat) - radians(lp.prev_lat)) / 2), 2)
               + cos(radians(lp.prev_lat)) * cos(radians(x.lat))
                 * pow(sin((radians(x.lon) - radians(lp.prev_lon)) / 2), 2)
           ))) AS distance_km
    FROM ev x
    JOIN located_previous lp USING (txn_id)
    WHERE x.located
)

SELECT
    x.txn_id,
    cw.card_count_1h, cw.card_count_24h, cw.card_count_7d, cw.card_count_30d,
    cw.card_sum_amount_1h, cw.card_sum_amount_24h, cw.card_sum_amount_7d, cw.card_sum_amount_30d,
    cw.card_avg_amount_7d, cw.card_avg_amount_30d,
    cw.card_max_amount_24h,
    cw.card_std_amount_30d,
    (x.amount - cw.card_avg_amount_30d) / cw.card_std_amount_30d AS card_amount_zscore_30d,
    cw.card_distinct_merchants_24h,
    (x.t - p.prev_t) / 1e6 AS card_seconds_since_last,
    cw.card_is_new_merchant_30d,
    CASE WHEN v.elapsed_us > 0 THEN v.distance_km / (v.elapsed_us / 3.6e9) END AS card_geo_velocity_kmh,
    mw.merchant_count_1h, mw.merchant_count_24h, mw.merchant_count_7d,
    hour(x.utc_time)::INTEGER AS hour_of_day,
    (isodow(x.utc_time) - 1)::INTEGER AS day_of_week,             -- Monday = 0
    isodow(x.utc_time) IN (6, 7) AS is_weekend                    -- Saturday, Sunday
FROM ev x
JOIN card_windows cw USING (txn_id)
JOIN merchant_windows mw USING (txn_id)
LEFT JOIN previous p USING (txn_id)
LEFT JOIN velocity v USING (txn_id)
ORDER BY x.txn_id
"""


def _events_for_sql(events: pa.Table) -> pa.Table:
    """The columns the oracle reads, checked, with event_time as timestamp[us, tz=UTC]."""
    needed = ["txn_id", "card_token", "merchant_id", "amount_minor", "event_time",
              "merchant_lat", "merchant_lon"]
    missing = [c for c in needed if c not in events.column_names]
    if missing:
        raise ValueError(f"events lack columns {missing}")
    events = events.select(needed)
    time_type = events.schema.field("event_time").type
    if not pa.types.is_timestamp(time_type):
        raise TypeError(f"event_time must be a timestamp, got {time_type}")
    if time_type.tz is None:
        raise TypeError("event_time must be timezone-aware (UTC)")
    if time_type != pa.timestamp("us", tz="UTC"):
        events = events.set_column(
            events.schema.get_field_index("event_time"), "event_time",
            events.column("event_time").cast(pa.timestamp("us", tz="UTC")))
    if pc.count_distinct(events.column("txn_id")).as_py() != events.num_rows:
        raise ValueError("txn_id must be unique")
    return events


def oracle_features(events: pa.Table) -> pa.Table:
    """Every feature of every transaction in ``events`` (canonical events), by plain SQL.

    One row per input transaction, ``txn_id`` first then :data:`FEATURE_COLUMNS`, sorted by
    ``txn_id``, typed as :data:`FEATURE_TYPES`.
    """
    ev = _events_for_sql(events)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("events", ev)
        result = con.sql(ORACLE_SQL).to_arrow_table()
    finally:
        con.close()
    schema = pa.schema([pa.field("txn_id", pa.string())]
                       + [pa.field(name, FEATURE_TYPES[name]) for name in FEATURE_COLUMNS])
    return result.select(schema.names).cast(schema)


# --------------------------------------------------------------------------------------------
# Comparison


def _fmt(value: object) -> str:
    return "NULL" if value is None else repr(value)


def compare_features(ours: pa.Table, oracle: pa.Table, *, rel: float = 1e-9,
                     abs_tol: float = 1e-12, check_types: bool = True,
                     max_examples: int = 5) -> list[str]:
    """Human-readable differences between a feature table and the oracle's; ``[]`` = equal.

    Rows are matched on ``txn_id``. Integers and booleans must match exactly, floats within
    ``rel`` relative tolerance (or ``abs_tol`` absolutely, for values near 0); NULL must meet
    NULL and NaN never matches anything. Missing or extra txn ids, missing feature columns
    and (with ``check_types``) feature columns of another Arrow type than the oracle's are
    reported too. At most ``max_examples`` differing rows are quoted per column.
    """
    problems: list[str] = []

    for name, table in (("ours", ours), ("oracle", oracle)):
        if "txn_id" not in table.column_names:
            return [f"{name} has no txn_id column"]
        ids = table.column("txn_id")
        if pc.count_distinct(ids).as_py() != table.num_rows:
            problems.append(f"{name} has duplicate txn_ids")
        if ids.null_count:
            problems.append(f"{name} has {ids.null_count} null txn_ids")
    if problems:
        return problems

    our_ids = ours.column("txn_id").to_pylist()
    oracle_ids = oracle.column("txn_id").to_pylist()
    our_pos = {txn: i for i, txn in enumerate(our_ids)}
    oracle_set = set(oracle_ids)
    missing = [txn for txn in oracle_ids if txn not in our_pos]
    extra = [txn for txn in our_ids if txn not in oracle_set]
    if missing:
        problems.append(f"{len(missing)} txn_ids missing from ours, e.g. {missing[:max_examples]}")
    if extra:
        problems.append(f"{len(extra)} extra txn_ids in ours, e.g. {extra[:max_examples]}")

    # Align: rows of the oracle present in ours, and the matching rows of ours.
    common_oracle_rows = np.array([i for i, txn in enumerate(oracle_ids) if txn in our_pos],
                                  dtype=np.int64)
    common_our_rows = np.array([our_pos[oracle_ids[i]] for i in common_oracle_rows],
                               dtype=np.int64)
    common_ids = [oracle_ids[i] for i in common_oracle_rows]

    columns = [c for c in oracle.column_names if c != "txn_id"]
    for column in columns:
        if column not in ours.column_names:
            problems.append(f"column {column} missing from ours")
            continue
        expected_col = oracle.column(column)
        actual_col = ours.column(column)
        if check_types and actual_col.type != expected_col.type:
            problems.append(f"column {column}: type {actual_col.type}, oracle has {expected_col.type}")
        expected = expected_col.take(pa.array(common_oracle_rows)).to_pylist()
        actual = actual_col.take(pa.array(common_our_rows)).to_pylist()
        is_float = pa.types.is_floating(expected_col.type) or pa.types.is_floating(actual_col.type)
        bad = [k for k, (a, e) in enumerate(zip(actual, expected))
               if not _same(a, e, is_float, rel, abs_tol)]
        if bad:
            examples = "; ".join(
                f"txn {common_ids[k]!r}: ours={_fmt(actual[k])} oracle={_fmt(expected[k])}"
                for k in bad[:max_examples])
            problems.append(f"column {column}: {len(bad)} of {len(expected)} rows differ, e.g. {examples}")
    return problems


def _same(actual: object, expected: object, is_float: bool, rel: float, abs_tol: float) -> bool:
    if actual is None or expected is None:
        return actual is None and expected is None
    if is_float:
        a, e = float(actual), float(expected)
        if math.isnan(a) or math.isnan(e):
            return False
        if a == e:
            return True
        return math.isclose(a, e, rel_tol=rel, abs_tol=abs_tol)
    if isinstance(actual, bool) != isinstance(expected, bool):
        return False
    return actual == expected


_FRAUD_RATE_SQL = """
WITH ev AS (
    SELECT txn_id, merchant_id, epoch_us(event_time) AS t, coalesce(is_fraud, false) AS fraud,
           epoch_us(label_time) AS label_t
    FROM events
)
SELECT x.txn_id,
       CASE WHEN count(y.txn_id) = 0 THEN NULL
            ELSE (count(y.txn_id) FILTER (WHERE y.fraud AND coalesce(y.label_t, y.t + $delay) < x.t))::DOUBLE
                 / count(y.txn_id) END AS rate
FROM ev x
LEFT JOIN ev y
  ON y.merchant_id = x.merchant_id
 AND y.t > x.t - $delay - $window
 AND y.t <= x.t - $delay
GROUP BY x.txn_id
ORDER BY x.txn_id
"""


def oracle_fraud_rate(events: pa.Table, *, window_us: int, delay_us: int) -> pa.Table:
    """Merchant fraud rate over (t - delay - W, t - delay], labels known before t, by self-join.

    A label's time is ``label_time`` where given, else event time + delay. NULL on an empty window.
    """
    import duckdb

    cols = ["txn_id", "merchant_id", "event_time", "is_fraud"]
    table = events.select(cols)
    label = events.column("label_time") if "label_time" in events.column_names else pa.nulls(
        events.num_rows, pa.timestamp("us", tz="UTC"))
    table = table.append_column("label_time", label.cast(pa.timestamp("us", tz="UTC")))
    con = duckdb.connect()
    try:
        con.register("events", table)
        sql = _FRAUD_RATE_SQL.replace("$window", str(int(window_us))).replace("$delay", str(int(delay_us)))
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()
