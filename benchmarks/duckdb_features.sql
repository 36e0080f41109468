-- Fast DuckDB computation of the card-fraud point-in-time features (benchmark / cross-check).
--
-- A single SELECT over the canonical events in the Parquet file named by the DuckDB variable
-- `input_parquet`; benchmarks/duckdb_features.py wraps it in COPY (...) TO '<out>' (FORMAT
-- parquet). By hand:
--     SET VARIABLE input_parquet = 'events.parquet';
--     COPY (<this query>) TO 'features.parquet' (FORMAT parquet);
-- It must agree exactly with the self-join oracle in tests/oracle.py (see tests/test_oracle.py).
--
-- The tie rule. The W-window of x holds the same entity's rows y with
--     (y.t, y.txn_id) < (x.t, x.txn_id)   and   y.t > x.t - W.
-- The upper bound orders by (time, txn_id), the lower bound by time alone, so no single frame
-- over event_time expresses it (a RANGE frame over t takes in x's same-time peers whatever
-- their txn_id). Instead every event gets its global rank g in (t, txn_id) order. Then
--   * "y before x"       <=>  g_y < g_x                   (g is a strict total order), and
--   * "y.t > x.t - W"    <=>  g_y > lo_W(x), where lo_W(x) = the number of events (of any
--                             entity) with t <= x.t - W: g numbers events in time order, so
--                             those are exactly the events with g <= lo_W(x).
-- So the window is the entity's rows with g in [lo_W + 1, g_x - 1], i.e. the frame
--     ORDER BY g RANGE BETWEEN (g - lo_W - 1) PRECEDING AND 1 PRECEDING
-- (a per-row offset, >= 0; 0 gives the empty frame [g, g - 1]). Every card feature then
-- shares one sort (card, g) and every merchant feature another (merchant, g).
--
-- Distinct merchants: count(DISTINCT merchant_id) over that frame (DuckDB evaluates framed
-- DISTINCT aggregates exactly). New merchant: the previous row of the same (card, merchant)
-- in (t, txn_id) order is the latest occurrence of x's merchant before x; the merchant is in
-- x's 30d window iff that row exists and is less than 30 days old.
--
-- Std: exact integer sums n, S1 = sum(a), S2 = sum(a^2) in HUGEINT; sample variance is
-- (n*S2 - S1^2) / (n(n-1)), whose numerator is an exact integer that is 0 exactly when all
-- values are equal (-> NULL) and otherwise positive.
WITH ev AS (
    SELECT txn_id, card_token, merchant_id,
           amount_minor AS amount,
           epoch_us(event_time) AS t,                               -- UTC microseconds
           event_time AT TIME ZONE 'UTC' AS utc_time,
           CASE WHEN merchant_lat IS NOT NULL AND merchant_lon IS NOT NULL
                THEN {'t': epoch_us(event_time), 'lat': merchant_lat, 'lon': merchant_lon}
           END AS loc
    FROM read_parquet(getvariable('input_parquet'))
),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY t, txn_id) AS g
    FROM ev
),
bounded AS (
    -- lo_W = number of events with t <= x.t - W; off_W = frame offset g - lo_W - 1.
    SELECT *,
        g - 1 - count(*) OVER (tw RANGE BETWEEN UNBOUNDED PRECEDING AND 3600000000 PRECEDING)    AS off_1h,
        g - 1 - count(*) OVER (tw RANGE BETWEEN UNBOUNDED PRECEDING AND 86400000000 PRECEDING)   AS off_24h,
        g - 1 - count(*) OVER (tw RANGE BETWEEN UNBOUNDED PRECEDING AND 604800000000 PRECEDING)  AS off_7d,
        g - 1 - count(*) OVER (tw RANGE BETWEEN UNBOUNDED PRECEDING AND 2592000000000 PRECEDING) AS off_30d
    FROM ranked
    WINDOW tw AS (ORDER BY t)
),
windowed AS (
    SELECT txn_id, amount, t, utc_time, loc,
        count(*) OVER c1h  AS card_count_1h,
        count(*) OVER c24h AS card_count_24h,
        count(*) OVER c7d  AS card_count_7d,
        count(*) OVER c30d AS card_count_30d,
        sum(amount) OVER c1h  AS sum_1h,
        sum(amount) OVER c24h AS sum_24h,
        sum(amount) OVER c7d  AS sum_7d,
        sum(amount::HUGEINT) OVER c30d AS sum_30d,
        sum(amount::HUGEINT * amount) OVER c30d AS sumsq_30d,
        max(amount) OVER c24h AS card_max_amount_24h,
        count(DISTINCT merchant_id) OVER c24h AS card_distinct_merchants_24h,
        lag(t) OVER (PARTITION BY card_token ORDER BY g) AS prev_t,
        last_value(loc IGNORE NULLS) OVER (PARTITION BY card_token ORDER BY g
                                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_loc,
        lag(t) OVER (PARTITION BY card_token, merchant_id ORDER BY g) AS prev_same_merchant_t,
        count(*) OVER m1h  AS merchant_count_1h,
        count(*) OVER m24h AS merchant_count_24h,
        count(*) OVER m7d  AS merchant_count_7d
    FROM bounded
    WINDOW c1h  AS (PARTITION BY card_token ORDER BY g RANGE BETWEEN off_1h  PRECEDING AND 1 PRECEDING),
           c24h AS (PARTITION BY card_token ORDER BY g RANGE BETWEEN off_24h PRECEDING AND 1 PRECEDING),
           c7d  AS (PARTITION BY card_token ORDER BY g RANGE BETWEEN off_7d  PRECEDING AND 1 PRECEDING),
           c30d AS (PARTITION BY card_token ORDER BY g RANGE BETWEEN off_30d PRECEDING AND 1 PRECEDING),
           m1h  AS (PARTITION BY merchant_id ORDER BY g RANGE BETWEEN off_1h  PRECEDING AND 1 PRECEDING),
           m24h AS (PARTITION BY merchant_id ORDER BY g RANGE BETWEEN off_24h PRECEDING AND 1 PRECEDING),
           m7d  AS (PARTITION BY merchant_id ORDER BY g RANGE BETWEEN off_7d  PRECEDING AND 1 PRECEDING)
),
stats AS (
    SELECT *,
        CASE WHEN card_count_30d > 0 THEN sum_30d / card_count_30d END AS avg_30d,
        CASE WHEN card_count_30d > 1 AND card_count_30d * sumsq_30d > sum_30d * sum_30d
             THEN sqrt((card_count_30d * sumsq_30d - sum_30d * sum_30d)::DOUBLE
                       / (card_count_30d * (card_count_30d - 1))::DOUBLE)
        END AS std_30d,
        CASE WHEN prev_loc IS NOT NULL AND loc IS NOT NULL AND loc.t > prev_loc.t
             THEN 2 * 6371.0 * asin(least(1.0, sqrt(
                      pow(sin((radians(loc.lat) - radians(prev_loc.lat)) / 2), 2)
                      + cos(radians(prev_loc.lat)) * cos(radians(loc.lat))
                        * pow(sin((radians(loc.lon) - radians(prev_loc.lon)) / 2), 2))))
                  / ((loc.t - prev_loc.t) / 3.6e9)
        END AS velocity
    FROM windowed
)
SELECT
    txn_id,
    card_count_1h, card_count_24h, card_count_7d, card_count_30d,
    coalesce(sum_1h, 0)::BIGINT  AS card_sum_amount_1h,
    coalesce(sum_24h, 0)::BIGINT AS card_sum_amount_24h,
    coalesce(sum_7d, 0)::BIGINT  AS card_sum_amount_7d,
    coalesce(sum_30d, 0)::BIGINT AS card_sum_amount_30d,
    CASE WHEN card_count_7d > 0 THEN sum_7d / card_count_7d END AS card_avg_amount_7d,
    avg_30d AS card_avg_amount_30d,
    card_max_amount_24h,
    std_30d AS card_std_amount_30d,
    (amount - avg_30d) / std_30d AS card_amount_zscore_30d,
    card_distinct_merchants_24h,
    (t - prev_t) / 1e6 AS card_seconds_since_last,
    (prev_same_merchant_t IS NULL OR prev_same_merchant_t <= t - 2592000000000) AS card_is_new_merchant_30d,
    velocity AS card_geo_velocity_kmh,
    merchant_count_1h, merchant_count_24h, merchant_count_7d,
    hour(utc_time)::INTEGER AS hour_of_day,
    (isodow(utc_time) - 1)::INTEGER AS day_of_week,
    isodow(utc_time) IN (6, 7) AS is_weekend
FROM stats
