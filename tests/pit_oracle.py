"""Independent oracle for point-in-time joins of entity rows: one plain DuckDB SQL query.

For an entity row q (card c, time T, optional merchant m and amount a) the W-window holds the
card's transactions y with ``y.t <= T`` and ``y.t > T - W`` (the contract of
``finfeat training-set --entities``). Written from that contract alone, with self-joins, to be
obviously right rather than fast. ``card_geo_velocity_kmh`` is not in it (no coordinates are
stored); z-score and new-merchant need the row's amount and merchant and are NULL without them.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa

_H1, _H24 = 3_600 * 1_000_000, 86_400 * 1_000_000
_D7, _D30 = 7 * _H24, 30 * _H24

PIT_SQL = f"""
WITH ev AS (
    SELECT txn_id, card_token, merchant_id, amount_minor AS amount, epoch_us(event_time) AS t FROM events
),
q AS (
    SELECT row_id, card_token, merchant_id, amount_minor AS amount, epoch_us(ts) AS t,
           ts AT TIME ZONE 'UTC' AS utc_time
    FROM queries
),
card AS (
    SELECT q.row_id,
        count(y.txn_id) FILTER (WHERE y.t > q.t - {_H1})  AS card_count_1h,
        count(y.txn_id) FILTER (WHERE y.t > q.t - {_H24}) AS card_count_24h,
        count(y.txn_id) FILTER (WHERE y.t > q.t - {_D7})  AS card_count_7d,
        count(y.txn_id) AS card_count_30d,
        coalesce(sum(y.amount) FILTER (WHERE y.t > q.t - {_H1}), 0)::BIGINT  AS card_sum_amount_1h,
        coalesce(sum(y.amount) FILTER (WHERE y.t > q.t - {_H24}), 0)::BIGINT AS card_sum_amount_24h,
        coalesce(sum(y.amount) FILTER (WHERE y.t > q.t - {_D7}), 0)::BIGINT  AS card_sum_amount_7d,
        coalesce(sum(y.amount), 0)::BIGINT AS card_sum_amount_30d,
        avg(y.amount) FILTER (WHERE y.t > q.t - {_D7}) AS card_avg_amount_7d,
        avg(y.amount) AS card_avg_amount_30d,
        max(y.amount) FILTER (WHERE y.t > q.t - {_H24}) AS card_max_amount_24h,
        CASE WHEN max(y.amount) > min(y.amount) THEN stddev_samp(y.amount) END AS card_std_amount_30d,
        count(DISTINCT y.merchant_id) FILTER (WHERE y.t > q.t - {_H24}) AS card_distinct_merchants_24h,
        CASE WHEN any_value(q.merchant_id) IS NOT NULL
             THEN count(y.txn_id) FILTER (WHERE y.merchant_id = q.merchant_id) = 0 END AS card_is_new_merchant_30d
    FROM q LEFT JOIN ev y ON y.card_token = q.card_token AND y.t <= q.t AND y.t > q.t - {_D30}
    GROUP BY q.row_id
),
last AS (
    SELECT q.row_id, max(y.t) AS last_t
    FROM q LEFT JOIN ev y ON y.card_token = q.card_token AND y.t <= q.t
    GROUP BY q.row_id
),
merchant AS (
    SELECT q.row_id,
        count(y.txn_id) FILTER (WHERE y.t > q.t - {_H1})  AS merchant_count_1h,
        count(y.txn_id) FILTER (WHERE y.t > q.t - {_H24}) AS merchant_count_24h,
        count(y.txn_id) AS merchant_count_7d
    FROM q LEFT JOIN ev y ON y.merchant_id = q.merchant_id AND y.t <= q.t AND y.t > q.t - {_D7}
    GROUP BY q.row_id
)
SELECT q.row_id AS txn_id,
    c.card_count_1h, c.card_count_24h, c.card_count_7d, c.card_count_30d,
    c.card_sum_amount_1h, c.card_sum_amount_24h, c.card_sum_amount_7d, c.card_sum_amount_30d,
    c.card_avg_amount_7d, c.card_avg_amount_30d, c.card_max_amount_24h, c.card_std_amount_30d,
    CASE WHEN c.card_std_amount_30d IS NOT NULL AND q.amount IS NOT NULL
         THEN (q.amount - c.card_avg_amount_30d) / c.card_std_amount_30d END AS card_amount_zscore_30d,
    c.card_distinct_merchants_24h,
    (q.t - l.last_t) / 1e6 AS card_seconds_since_last,
    c.card_is_new_merchant_30d,
    CASE WHEN q.merchant_id IS NOT NULL THEN m.merchant_count_1h END AS merchant_count_1h,
    CASE WHEN q.merchant_id IS NOT NULL THEN m.merchant_count_24h END AS merchant_count_24h,
    CASE WHEN q.merchant_id IS NOT NULL THEN m.merchant_count_7d END AS merchant_count_7d,
    hour(q.utc_time)::INTEGER AS hour_of_day,
    (isodow(q.utc_time) - 1)::INTEGER AS day_of_week,
    isodow(q.utc_time) >= 6 AS is_weekend,
    make_timestamptz(l.last_t) AS as_of
FROM q JOIN card c USING (row_id) JOIN last l USING (row_id) JOIN merchant m USING (row_id)
ORDER BY q.row_id
"""


def oracle_point_in_time(events: pa.Table, queries: pa.Table) -> pa.Table:
    """``events``: txn_id, card_token, merchant_id, amount_minor, event_time (UTC);
    ``queries``: row_id (text), card_token, ts (UTC), and merchant_id / amount_minor (may be null)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events", events)
    con.register("queries", queries)
    return con.sql(PIT_SQL).to_arrow_table()
