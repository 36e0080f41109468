-- Fast DuckDB computation of the card-fraud point-in-time features (benchmark and
-- cross-check of the feature engine). It must agree exactly with the self-join oracle in
-- tests/oracle.py; tests/test_oracle.py checks that on random and on public data.
--
-- One SELECT over the canonical events in the Parquet file named by the DuckDB variable
-- `input_parquet`; benchmarks/duckdb_features.py wraps it in COPY (...) TO (FORMAT parquet).
-- By hand (duckdb CLI):
--     SET TimeZone = 'UTC';
--     SET VARIABLE input_parquet = 'events.parquet';
--     COPY (<this query>) TO 'features.parquet' (FORMAT parquet);
--
-- THE TIE RULE. The W-window of transaction x holds the same entity's transactions y with
--     (y.t, y.txn_id) < (x.t, x.txn_id)      and      y.t > x.t - W      (t in UTC µs).
-- A RANGE frame over t alone would take in x's same-time peers whatever their txn_id, and a
-- ROWS frame over (t, txn_id) cannot express the time bound. So every event gets one integer
-- sort key that orders by (t, txn_id) *and* measures time:
--     peer_rank = number of events (any entity) at the same t with a smaller txn_id,
--     P         = 1 + the largest peer_rank,
--     k         = (t - t_min) * P + peer_rank.
-- Since 0 <= peer_rank < P, k orders events exactly by (t, txn_id), and
--     y before x         <=>  k_y <= k_x - 1
--     y.t > x.t - W      <=>  y.t >= x.t - W + 1  <=>  k_y >= (x.t - W + 1 - t_min) * P
--                        <=>  k_x - k_y <= (W - 1) * P + peer_rank_x,
-- so the W-window is the frame
--     PARTITION BY entity ORDER BY k RANGE BETWEEN ((W - 1) * P + peer_rank) PRECEDING
--                                               AND 1 PRECEDING
-- and every card feature shares one sort (card, k), every merchant feature another. (BIGINT
-- arithmetic in DuckDB is overflow-checked: data whose time span times P exceeded 2^63 µs would
-- raise an error, never give a wrong answer.)
--
-- DISTINCT MERCHANTS: count(DISTINCT merchant_id) over that exact frame (DuckDB evaluates
-- framed DISTINCT aggregates exactly). NEW MERCHANT: the previous row of the same
-- (card, merchant) in k order is the latest occurrence of x's merchant before x; the merchant
-- occurs in x's 30d window iff that row exists and its time is > x.t - 30d.
--
-- STD: exact HUGEINT sums n, S1 = sum(a), S2 = sum(a^2); the sample variance is
-- (n*S2 - S1^2) / (n(n-1)), whose numerator is an exact integer that is 0 exactly when all
-- values are equal (std NULL then, as for n < 2), so only the final division and sqrt round.
WITH ev AS (
    SELECT txn_id, card_token, merchant_id,
           amount_minor AS amount,
           epoch_us(event_time) AS t,                               -- UTC microseconds
           CASE WHEN merchant_lat IS NOT NULL AND merchant_lon IS NOT NULL
                THEN {'t': epoch_us(event_time), 'lat': merchant_lat, 'lon': merchant_lon}
           END AS loc                                               -- NULL = no location
    FROM read_parquet(getvariable('input_parquet'))
),
peers AS (
    -- number of events (any entity) at the same instant with a smaller txn_id
    SELECT *, row_number() OVER (PARTITION BY t ORDER BY txn_id) - 1 AS peer_rank
    FROM ev
),
keyed AS (
    SELECT *,
           (t - min(t) OVER ()) * (max(peer_rank) OVER () + 1) + peer_rank AS k,
           max(peer_rank) OVER () + 1 AS p
    FROM peers
),
windowed AS (
    SELECT txn_id, amount, t, loc,
        count(*) OVER c1h  AS card_count_1h,
        count(*) OVER c24h AS card_count_24h,
        count(*) OVER c7d  AS card_count_7d,
        count(*) OVER c30d AS card_count_30d,
        sum(amount) OVER c1h  AS sum_1h,
        sum(amount) OVER c24h AS sum_24h,
        sum(amount) OVER c7d  AS sum_7d,
        sum(amount) OVER c30d AS sum_30d,                           -- HUGEINT
        sum(amount::HUGEINT * amount) OVER c30d AS sumsq_30d,
        max(amount) OVER c24h AS card_max_amount_24h,
        count(DISTINCT merchant_id) OVER c24h AS card_distinct_merchants_24h,
        lag(t) OVER card_order AS prev_t,
        last_value(loc IGNORE NULLS) OVER (card_order ROWS BETWEEN UNBOUNDED PRECEDING
                                                            AND 1 PRECEDING) AS prev_loc,
        lag(t) OVER (PARTITION BY card_token, merchant_id ORDER BY k) AS prev_same_merchant_t,
        count(*) OVER m1h  AS merchant_count_1h,
        count(*) OVER m24h AS merchant_count_24h,
        count(*) OVER m7d  AS merchant_count_7d
    FROM keyed
    WINDOW card_order AS (PARTITION BY card_token ORDER BY k),
           c1h  AS (card_order RANGE BETWEEN (3599999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           c24h AS (card_order RANGE BETWEEN (86399999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           c7d  AS (card_order RANGE BETWEEN (604799999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           c30d AS (card_order RANGE BETWEEN (2591999999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           merchant_order AS (PARTITION BY merchant_id ORDER BY k),
           m1h  AS (merchant_order RANGE BETWEEN (3599999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           m24h AS (merchant_order RANGE BETWEEN (86399999999 * p + peer_rank) PRECEDING AND 1 PRECEDING),
           m7d  AS (merchant_order RANGE BETWEEN (604799999999 * p + peer_rank) PRECEDING AND 1 PRECEDING)
),
derived AS (
    SELECT *,
        CASE WHEN card_count_30d > 0 THEN sum_30d / card_count_30d END AS avg_30d,
        CASE WHEN card_count_30d * sumsq_30d > sum_30d * sum_30d          -- false for n < 2
             THEN sqrt((card_count_30d * sumsq_30d - sum_30d * sum_30d)::DOUBLE
                       / (card_count_30d * (card_count_30d - 1))::DOUBLE)
        END AS std_30d,
        CASE WHEN loc IS NOT NULL AND prev_loc IS NOT NULL AND loc.t > prev_loc.t
             THEN 2 * 6371.0 * asin(least(1.0, sqrt(
                      pow(sin((radians(loc.lat) - radians(prev_loc.lat)) / 2), 2)
                      + cos(radians(prev_loc.lat)) * cos(radians(loc.lat))
                        * pow(sin((radians(loc.lon) - radians(prev_loc.lon)) / 2), 2))))
                  / ((loc.t - prev_loc.t) / 3.6e9)
        END AS velocity,
        make_timestamp(t) AS utc_time                               -- naive UTC wall clock
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
    (prev_same_merchant_t IS NULL OR prev_same_merchant_t <= t - 2592000000000)
        AS card_is_new_merchant_30d,
    velocity AS card_geo_velocity_kmh,
    merchant_count_1h, merchant_count_24h, merchant_count_7d,
    hour(utc_time)::INTEGER AS hour_of_day,
    (isodow(utc_time) - 1)::INTEGER AS day_of_week,                 -- Monday = 0
    isodow(utc_time) IN (6, 7) AS is_weekend                        -- Saturday, Sunday
FROM derived
