"""Seeded synthetic card transactions with labelled fraud patterns.

:func:`generate` writes ``events`` raw transactions (Parquet or JSON Lines) that look like an
issuer's card feed *before* tokenization: there is a real-looking card number (16 digits,
Luhn-valid, IIN ``4xxxxx`` / ``51xxxx``-``55xxxx``) that the pipeline must tokenize, integer
minor-unit amounts, UTC event times, and the two labels ``is_fraud`` / ``fraud_pattern``.

Everything is drawn from one ``numpy.random.default_rng(seed)``; the same seed and the same
arguments give a byte-identical file (``chunk_size`` is an argument too: it changes the draw
order). The generator streams: the world (cities, merchants, cards) and the fraud plan are built
first, then the time range is cut into slices of whole minutes holding at most ``chunk_size``
events each, and every slice is drawn, sorted by event time, written (one Parquet row group per
slice) and dropped. Only per-card / per-merchant state and the planned events (about
``fraud_rate * events`` rows) live for the whole run.

Behaviour modelled
------------------
World
    17 cities (13 US, 4 European). Merchants belong to one of 15 categories; ``*_net``
    categories are online merchants (channel ``online``; half of them publish no location, so
    ``merchant_lat/lon`` are null), ``cash_withdrawal`` merchants are ATMs (channel ``atm``,
    amounts in multiples of 20.00), the rest are ``pos`` merchants placed around a city. Each
    merchant has a log-normal popularity. Currency follows the merchant: ``EUR``/``GBP`` in the
    European cities, ``USD`` everywhere else (online merchants included).
genuine
    Every card has a home (a US city plus a few km of jitter; ``card_lat/lon``), a spending
    scale (log-normal) and a daily rate drawn from a gamma distribution: cards transact as
    independent Poisson processes with gamma-mixed rates sharing one time profile, which is
    simulated exactly by drawing per-minute totals from a multinomial and then assigning each
    event to a card with probability proportional to its rate. The profile is diurnal (few
    events between 1 and 5 a.m., peaks at lunch and early evening; times are UTC and treated
    as local) and weekly (Friday/Saturday busier, Sunday quieter). Each card has 12 preferred
    merchants (9 popular ones in its home city, 3 online) with card-specific weights; most
    purchases go to them, the rest explore other home-city or online merchants, more so on
    weekends, when baskets are also ~10 % larger. Amounts are log-normal per category, scaled
    by the card. About 5 % of cards take one trip (2-10 days, a third of them to Europe):
    during it their in-person purchases happen in the trip city and currency.
card_testing
    A burst of 5-40 tiny amounts (50-300 cents) at 1-3 online merchants, seconds apart (the
    whole burst lasts minutes), often at night; 60 % of bursts end with one large online
    purchase a few minutes later.
account_takeover
    A card suddenly transacts in a city more than 650 km from home, 3-12 times over 1-6 hours,
    at merchants it never used, for 3-10 times its usual amounts (ATM withdrawals included).
amount_spike
    A single purchase 8-30 times the card's usual amount for that category (taken as at least
    50.00), at one of the card's own merchants or at an online shop.
merchant_compromise
    A popular in-person merchant is compromised for 3-14 days; the cards seen there in that
    window have genuine (unlabelled) transactions at it, and about 70 % of them see 1-3 fraud
    transactions 2-20 days later elsewhere (online or in another city).

The fraud budget ``round(fraud_rate * events)`` is split 35/25/15/25 % between the patterns
above; the merchant-compromise visits are extra genuine events, so the label share is
``fraud_rate`` up to rounding. With ``time_resolution="s"`` event times are truncated to whole
seconds after sorting, which ties many timestamps (bursts above all) on purpose.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

_LOG = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "CHANNELS",
    "FRAUD_PATTERNS",
    "GENERATED_SCHEMA",
    "GenerateSummary",
    "generate",
    "luhn_valid",
]

#: Column order and Arrow types of a generated file.
GENERATED_SCHEMA = pa.schema(
    [
        pa.field("txn_id", pa.string(), nullable=False),
        pa.field("card_number", pa.string(), nullable=False),
        pa.field("merchant_id", pa.string(), nullable=False),
        pa.field("merchant_category", pa.string(), nullable=False),
        pa.field("amount_minor", pa.int64(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("channel", pa.string(), nullable=False),
        pa.field("card_lat", pa.float64(), nullable=False),
        pa.field("card_lon", pa.float64(), nullable=False),
        pa.field("merchant_lat", pa.float64()),
        pa.field("merchant_lon", pa.float64()),
        pa.field("is_fraud", pa.bool_(), nullable=False),
        pa.field("fraud_pattern", pa.string()),
    ]
)

FRAUD_PATTERNS: tuple[str, ...] = ("card_testing", "account_takeover", "amount_spike", "merchant_compromise")
_CT, _ATO, _SPIKE, _MC = range(4)
_GENUINE = -1
_PATTERN_SHARES = (0.35, 0.25, 0.15, 0.25)

CHANNELS: tuple[str, ...] = ("pos", "online", "atm")
_POS, _ONLINE, _ATM = range(3)

# name, channel, share of merchants, median amount (minor units), log-sd of the amount
_CATEGORY_TABLE: tuple[tuple[str, int, float, float, float], ...] = (
    ("grocery_pos", _POS, 0.11, 4_500, 0.70),
    ("grocery_net", _ONLINE, 0.04, 5_500, 0.60),
    ("gas_transport", _POS, 0.10, 4_000, 0.45),
    ("shopping_pos", _POS, 0.09, 6_000, 0.95),
    ("shopping_net", _ONLINE, 0.09, 7_500, 1.05),
    ("misc_pos", _POS, 0.06, 2_500, 1.00),
    ("misc_net", _ONLINE, 0.06, 2_000, 1.05),
    ("food_dining", _POS, 0.10, 3_000, 0.70),
    ("entertainment", _POS, 0.06, 4_000, 0.85),
    ("health_fitness", _POS, 0.05, 3_500, 0.80),
    ("personal_care", _POS, 0.05, 2_500, 0.80),
    ("kids_pets", _POS, 0.05, 3_500, 0.80),
    ("home", _POS, 0.06, 5_500, 1.00),
    ("travel", _POS, 0.03, 25_000, 1.10),
    ("cash_withdrawal", _ATM, 0.05, 8_000, 0.70),
)
CATEGORIES: tuple[str, ...] = tuple(row[0] for row in _CATEGORY_TABLE)
_CAT_CHANNEL = np.array([row[1] for row in _CATEGORY_TABLE], dtype=np.int8)
_CAT_SHARE = np.array([row[2] for row in _CATEGORY_TABLE])
_CAT_SHARE = _CAT_SHARE / _CAT_SHARE.sum()
_CAT_LOG_MEDIAN = np.log(np.array([row[3] for row in _CATEGORY_TABLE], dtype=np.float64))
_CAT_SIGMA = np.array([row[4] for row in _CATEGORY_TABLE])
_CAT_SHOPPING_NET = CATEGORIES.index("shopping_net")

_CURRENCIES: tuple[str, ...] = ("USD", "EUR", "GBP")
# name, lat, lon, currency index, weight (share of population among its region)
_CITY_TABLE: tuple[tuple[str, float, float, int, float], ...] = (
    ("new_york", 40.7128, -74.0060, 0, 8.3),
    ("los_angeles", 34.0522, -118.2437, 0, 3.9),
    ("chicago", 41.8781, -87.6298, 0, 2.7),
    ("houston", 29.7604, -95.3698, 0, 2.3),
    ("phoenix", 33.4484, -112.0740, 0, 1.6),
    ("philadelphia", 39.9526, -75.1652, 0, 1.6),
    ("san_antonio", 29.4241, -98.4936, 0, 1.4),
    ("dallas", 32.7767, -96.7970, 0, 1.3),
    ("seattle", 47.6062, -122.3321, 0, 0.8),
    ("denver", 39.7392, -104.9903, 0, 0.7),
    ("atlanta", 33.7490, -84.3880, 0, 0.5),
    ("miami", 25.7617, -80.1918, 0, 0.5),
    ("boston", 42.3601, -71.0589, 0, 0.7),
    ("london", 51.5074, -0.1278, 2, 1.0),
    ("paris", 48.8566, 2.3522, 1, 1.0),
    ("berlin", 52.5200, 13.4050, 1, 1.0),
    ("madrid", 40.4168, -3.7038, 1, 1.0),
)
_N_CITIES = len(_CITY_TABLE)
_CITY_LAT = np.array([c[1] for c in _CITY_TABLE])
_CITY_LON = np.array([c[2] for c in _CITY_TABLE])
_CITY_CURRENCY = np.array([c[3] for c in _CITY_TABLE], dtype=np.int8)
_CITY_DOMESTIC = _CITY_CURRENCY == 0
_CITY_WEIGHT = np.array([c[4] for c in _CITY_TABLE])
_ONLINE_GROUP = _N_CITIES  # merchant group index of online merchants
_FOREIGN_MERCHANT_SHARE = 0.12  # share of in-person merchants located in Europe

_MIN_MERCHANTS = _N_CITIES + len(_CATEGORY_TABLE)
_N_PREF = 12  # preferred merchants per card
_N_PREF_LOCAL = 9
_TRAVELLER_SHARE = 0.05
_FAR_KM = 650.0  # account takeover happens at least this far from the home city (centre to centre)
_TRIP_MIN_KM = 300.0
_MAX_AMOUNT = 5_000_000  # 50 000.00: cap of any single amount

_US_PER_S = 1_000_000
_US_PER_MIN = 60 * _US_PER_S
_US_PER_H = 60 * _US_PER_MIN
_US_PER_DAY = 24 * _US_PER_H
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Relative transaction intensity at each hour of the (UTC-as-local) day, interpolated per minute.
_HOURLY = np.array([0.25, 0.15, 0.10, 0.08, 0.08, 0.12, 0.30, 0.55, 0.80, 0.95, 1.00, 1.10,
                    1.25, 1.15, 1.00, 0.95, 1.00, 1.15, 1.30, 1.30, 1.10, 0.85, 0.60, 0.40])
# Monday .. Sunday
_WEEKDAY = np.array([0.95, 0.95, 0.97, 1.00, 1.10, 1.15, 0.88])

_HEX_LUT = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[
    np.stack([np.arange(256) >> 4, np.arange(256) & 15], axis=1)
]  # (256, 2): byte -> two lowercase hex digits
_JSONL_SLICE = 500_000  # rows serialized at once (keeps Arrow string offsets far below 2**31)


@dataclass(frozen=True)
class GenerateSummary:
    """What :func:`generate` wrote. ``start``/``end`` bound the simulated window ``[start, end)``."""

    path: str
    events: int
    frauds: int
    by_pattern: dict[str, int]
    start: datetime
    end: datetime


def luhn_valid(number: str) -> bool:
    """True when ``number`` is all digits and passes the Luhn check."""
    if not number.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# --------------------------------------------------------------------------------------- world


@dataclass
class _World:
    """Cities, merchants (sorted by group: city index, online last) and cards."""

    group_lo: np.ndarray      # (n_groups,) first merchant of each group
    group_hi: np.ndarray      # (n_groups,) one past the last
    cum_pop: np.ndarray       # (M + 1,) cumulative merchant popularity
    m_cat: np.ndarray         # (M,) category index
    m_lat: np.ndarray         # (M,) NaN when the merchant publishes no location
    m_lon: np.ndarray
    m_currency: np.ndarray    # (M,) index into _CURRENCIES
    m_id: pa.Array            # (M,) merchant_id strings
    online: np.ndarray        # indices of online merchants
    online_shopping: np.ndarray  # online merchants selling goods (card testing cash-out)
    c_pan: pa.Array           # (C,) card_number strings
    c_city: np.ndarray        # (C,) home city
    c_lat: np.ndarray
    c_lon: np.ndarray
    c_log_scale: np.ndarray   # (C,) log of the card's spending scale
    c_cum_rate: np.ndarray    # (C,) cumulative daily rates (for rate-proportional sampling)
    c_pref: np.ndarray        # (C, K) preferred merchants
    c_pref_cum: np.ndarray    # (C, K) cumulative preference weights, last column == 1
    c_trip_city: np.ndarray   # (C,) trip city (meaningless unless trip_end > trip_start)
    c_trip_start: np.ndarray  # (C,) µs
    c_trip_end: np.ndarray
    far: np.ndarray           # (n_cities, n_cities) far cities of each city, padded
    far_n: np.ndarray         # (n_cities,)

    def pick_weighted(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        """One merchant per entry of ``groups``, popularity-weighted within the group."""
        lo = self.group_lo[groups]
        hi = self.group_hi[groups]
        a = self.cum_pop[lo]
        x = a + rng.random(len(groups)) * (self.cum_pop[hi] - a)
        idx = np.searchsorted(self.cum_pop, x, side="right") - 1
        return np.clip(idx, lo, hi - 1)

    def pick_uniform(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        """One merchant per entry of ``groups``, uniformly within the group."""
        lo = self.group_lo[groups]
        hi = self.group_hi[groups]
        idx = lo + (rng.random(len(groups)) * (hi - lo)).astype(np.int64)
        return np.minimum(idx, hi - 1)


def _haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlat = p2 - p1
    dlon = np.radians(lon2) - np.radians(lon1)
    a = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.minimum(a, 1.0)))


def _fixed_width_strings(chars: np.ndarray) -> pa.Array:
    """An ``(n, w)`` uint8 matrix of ASCII characters to an Arrow string array (no copy of rows)."""
    n, w = chars.shape
    if n * w >= 2**31:
        raise ValueError("chunk too large for one Arrow string array; lower chunk_size")
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(w)
    data = np.ascontiguousarray(chars, dtype=np.uint8).reshape(-1)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _hex(values: np.ndarray, nbytes: int) -> np.ndarray:
    """Unsigned integers to an ``(n, 2 * nbytes)`` matrix of lowercase hex digits (big-endian)."""
    raw = values.astype(f">u{nbytes}").view(np.uint8).reshape(-1, nbytes)
    return _HEX_LUT[raw].reshape(-1, 2 * nbytes)


def _make_pans(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct 16-digit Luhn-valid PANs as an ``(n, 16)`` digit matrix."""
    digits = np.empty((n, 16), dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        k = len(todo)
        body = rng.integers(0, 10, size=(k, 15))
        visa = rng.random(k) < 0.55
        body[:, 0] = np.where(visa, 4, 5)
        body[:, 1] = np.where(visa, body[:, 1], rng.integers(1, 6, size=k))  # Mastercard 51-55
        dbl = body[:, ::-2] * 2  # payload digits doubled: every other one from the right
        dbl = np.where(dbl > 9, dbl - 9, dbl)
        total = dbl.sum(axis=1) + body[:, -2::-2].sum(axis=1)
        digits[todo, :15] = body
        digits[todo, 15] = (10 - total % 10) % 10
        as_int = digits[:, :15] @ (10 ** np.arange(14, -1, -1, dtype=np.int64))
        _, first = np.unique(as_int, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        todo = np.flatnonzero(dup)
    return digits


def _build_world(rng: np.random.Generator, *, n_cards: int, n_merchants: int,
                 start_us: int, end_us: int) -> _World:
    n_cat = len(CATEGORIES)
    pos_cats = np.flatnonzero(_CAT_CHANNEL != _ONLINE)

    # --- merchants: categories (every city gets an in-person merchant, every category a merchant)
    cat = rng.choice(n_cat, size=n_merchants, p=_CAT_SHARE)
    p_pos = _CAT_SHARE[pos_cats] / _CAT_SHARE[pos_cats].sum()
    cat[:_N_CITIES] = rng.choice(pos_cats, size=_N_CITIES, p=p_pos)
    cat[_N_CITIES:_N_CITIES + n_cat] = rng.permutation(n_cat)  # every category exists
    is_online = _CAT_CHANNEL[cat] == _ONLINE

    city_p = np.where(_CITY_DOMESTIC,
                      (1 - _FOREIGN_MERCHANT_SHARE) * _CITY_WEIGHT / _CITY_WEIGHT[_CITY_DOMESTIC].sum(),
                      _FOREIGN_MERCHANT_SHARE * _CITY_WEIGHT / _CITY_WEIGHT[~_CITY_DOMESTIC].sum())
    group = rng.choice(_N_CITIES, size=n_merchants, p=city_p)
    group[:_N_CITIES] = np.arange(_N_CITIES)
    group = np.where(is_online, _ONLINE_GROUP, group)

    # location: around the city; online merchants: half publish an HQ in a US city, half nothing
    home = np.where(is_online, rng.choice(np.flatnonzero(_CITY_DOMESTIC), size=n_merchants), group)
    lat = _CITY_LAT[home] + rng.normal(0.0, 0.12, n_merchants)
    lon = _CITY_LON[home] + rng.normal(0.0, 0.12, n_merchants) / np.cos(np.radians(_CITY_LAT[home]))
    hidden = is_online & (rng.random(n_merchants) < 0.5)
    lat = np.where(hidden, np.nan, np.round(lat, 6))
    lon = np.where(hidden, np.nan, np.round(lon, 6))
    popularity = rng.lognormal(0.0, 1.0, n_merchants)
    id_num = rng.permutation(n_merchants)

    order = np.lexsort((np.arange(n_merchants), group))
    cat, group, lat, lon = cat[order], group[order], lat[order], lon[order]
    popularity, id_num = popularity[order], id_num[order]
    n_groups = _N_CITIES + 1
    group_lo = np.searchsorted(group, np.arange(n_groups), side="left")
    group_hi = np.searchsorted(group, np.arange(n_groups), side="right")
    cum_pop = np.concatenate([[0.0], np.cumsum(popularity)])
    currency = np.where(group == _ONLINE_GROUP, 0, _CITY_CURRENCY[np.minimum(group, _N_CITIES - 1)])
    width = max(6, len(str(n_merchants - 1)))
    m_id = pa.array([f"m{i:0{width}d}" for i in id_num.tolist()], pa.string())
    online = np.arange(group_lo[_ONLINE_GROUP], group_hi[_ONLINE_GROUP])
    online_shopping = online[cat[online] == _CAT_SHOPPING_NET]
    if len(online_shopping) == 0:
        online_shopping = online

    # --- city distances
    dist = _haversine_km(_CITY_LAT[:, None], _CITY_LON[:, None], _CITY_LAT[None, :], _CITY_LON[None, :])
    far = np.zeros((_N_CITIES, _N_CITIES), dtype=np.int64)
    far_n = np.zeros(_N_CITIES, dtype=np.int64)
    for c in range(_N_CITIES):
        cand = np.flatnonzero(dist[c] > _FAR_KM)
        far[c, : len(cand)] = cand
        far_n[c] = len(cand)

    # --- cards
    domestic = np.flatnonzero(_CITY_DOMESTIC)
    c_city = rng.choice(domestic, size=n_cards, p=_CITY_WEIGHT[domestic] / _CITY_WEIGHT[domestic].sum())
    c_lat = np.round(_CITY_LAT[c_city] + rng.normal(0.0, 0.10, n_cards), 6)
    c_lon = np.round(_CITY_LON[c_city] + rng.normal(0.0, 0.10, n_cards) / np.cos(np.radians(_CITY_LAT[c_city])), 6)
    c_log_scale = rng.normal(0.0, 0.4, n_cards)
    rate = rng.gamma(1.5, 1.0, n_cards)
    c_cum_rate = np.cumsum(rate)
    pan_digits = _make_pans(rng, n_cards)
    c_pan = _fixed_width_strings((pan_digits + ord("0")).astype(np.uint8))

    world = _World(
        group_lo=group_lo, group_hi=group_hi, cum_pop=cum_pop, m_cat=cat, m_lat=lat, m_lon=lon,
        m_currency=currency.astype(np.int8), m_id=m_id, online=online, online_shopping=online_shopping,
        c_pan=c_pan, c_city=c_city, c_lat=c_lat, c_lon=c_lon, c_log_scale=c_log_scale, c_cum_rate=c_cum_rate,
        c_pref=np.empty((0, _N_PREF), dtype=np.int64), c_pref_cum=np.empty((0, _N_PREF)),
        c_trip_city=np.zeros(n_cards, dtype=np.int64), c_trip_start=np.zeros(n_cards, dtype=np.int64),
        c_trip_end=np.zeros(n_cards, dtype=np.int64), far=far, far_n=far_n,
    )

    # preferred merchants: 9 popular ones at home, 3 online; card-specific (gamma) weights
    local = world.pick_weighted(rng, np.repeat(c_city, _N_PREF_LOCAL)).reshape(n_cards, _N_PREF_LOCAL)
    onl = world.pick_weighted(rng, np.full(n_cards * (_N_PREF - _N_PREF_LOCAL), _ONLINE_GROUP))
    world.c_pref = np.concatenate([local, onl.reshape(n_cards, -1)], axis=1).astype(np.int32)
    w = rng.gamma(0.7, 1.0, (n_cards, _N_PREF)) + 1e-9
    cum = np.cumsum(w, axis=1)
    cum /= cum[:, -1:]
    cum[:, -1] = 1.0
    world.c_pref_cum = cum.astype(np.float32)

    # one trip for ~5 % of the cards
    travel = rng.random(n_cards) < _TRAVELLER_SHARE
    abroad = rng.random(n_cards) < 0.35
    trip_city = np.where(abroad, rng.choice(np.flatnonzero(~_CITY_DOMESTIC), size=n_cards),
                         rng.choice(domestic, size=n_cards))
    same = dist[c_city, trip_city] < _TRIP_MIN_KM
    trip_city = np.where(same, far[c_city, 0], trip_city)  # every home city has a far city
    trip_len = rng.integers(2 * _US_PER_DAY, 10 * _US_PER_DAY, n_cards)
    trip_start = start_us + (rng.random(n_cards) * max(end_us - start_us - _US_PER_DAY, 1)).astype(np.int64)
    world.c_trip_city = trip_city
    world.c_trip_start = np.where(travel, trip_start, 0)
    world.c_trip_end = np.where(travel, trip_start + trip_len, 0)
    return world


def _genuine_amounts(rng: np.random.Generator, world: _World, card: np.ndarray, merchant: np.ndarray,
                     factor: np.ndarray | float = 1.0) -> np.ndarray:
    cat = world.m_cat[merchant]
    log_amt = _CAT_LOG_MEDIAN[cat] + world.c_log_scale[card] + _CAT_SIGMA[cat] * rng.standard_normal(len(card))
    amt = np.exp(log_amt) * factor
    return _finish_amounts(amt, cat, floor=100)


def _finish_amounts(amt: np.ndarray, cat: np.ndarray, *, floor: int) -> np.ndarray:
    """Round to integer minor units; ATM amounts to multiples of 20.00; clamp into range."""
    amt = np.minimum(np.rint(amt), _MAX_AMOUNT).astype(np.int64)
    atm = _CAT_CHANNEL[cat] == _ATM
    amt = np.where(atm, np.maximum(np.rint(amt / 2000.0).astype(np.int64), 1) * 2000, amt)
    return np.maximum(amt, floor)


# ---------------------------------------------------------------------------------- fraud plan


@dataclass
class _Events:
    time: np.ndarray      # int64 µs
    card: np.ndarray      # int64
    merchant: np.ndarray  # int64
    amount: np.ndarray    # int64 minor units
    pattern: np.ndarray   # int8, -1 for genuine

    @staticmethod
    def empty() -> _Events:
        z = np.zeros(0, dtype=np.int64)
        return _Events(z, z, z, z, np.zeros(0, dtype=np.int8))

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        if not parts:
            return _Events.empty()
        return _Events(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("time", "card", "merchant", "amount", "pattern")))

    def take(self, idx: np.ndarray | slice) -> _Events:
        return _Events(self.time[idx], self.card[idx], self.merchant[idx], self.amount[idx], self.pattern[idx])

    def __len__(self) -> int:
        return len(self.time)


def _episode_starts(rng: np.random.Generator, n: int, start_us: int, end_us: int, *,
                    max_len_us: int, night_share: float) -> np.ndarray:
    """Episode start times in the window, leaving room for the episode; some moved to the night."""
    span = max(end_us - start_us - max_len_us, 1)
    t = start_us + (rng.random(n) * span).astype(np.int64)
    night = rng.random(n) < night_share
    day0 = (t // _US_PER_DAY) * _US_PER_DAY
    t_night = day0 + (rng.random(n) * 5 * _US_PER_H).astype(np.int64)  # 00:00-05:00
    t = np.where(night & (t_night >= start_us), t_night, t)
    return t


def _within_episode_offsets(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode index and position inside the episode of every event of concatenated episodes."""
    ep = np.repeat(np.arange(len(sizes)), sizes)
    first = np.cumsum(sizes) - sizes
    return ep, np.arange(len(ep)) - first[ep]


def _episodes_for_budget(sizes: np.ndarray, budget: int) -> int:
    """How many leading episodes are needed to reach ``budget`` events."""
    return int(np.searchsorted(np.cumsum(sizes), budget, side="left")) + 1


def _plan_card_testing(rng: np.random.Generator, w: _World, budget: int, cards: np.ndarray,
                       start_us: int, end_us: int) -> _Events:
    cand = budget // 5 + 1
    sizes = rng.integers(5, 41, cand)
    cash_out = rng.random(cand) < 0.6
    n_ep = min(_episodes_for_budget(sizes + cash_out, budget), cand)
    sizes, cash_out = sizes[:n_ep], cash_out[:n_ep]
    total = sizes + cash_out
    ep, pos = _within_episode_offsets(total)
    n = len(ep)
    is_cash_out = pos == sizes[ep]
    mean_gap = rng.uniform(2.0, 20.0, n_ep)  # seconds between tests
    gap_s = np.where(is_cash_out, rng.uniform(120.0, 1800.0, n), rng.exponential(1.0, n) * mean_gap[ep])
    gap_s = np.where(pos == 0, 0.0, gap_s)
    gap = (gap_s * _US_PER_S).astype(np.int64)
    cum = np.cumsum(gap)
    first = np.cumsum(total) - total
    offset = cum - cum[first][ep]
    starts = _episode_starts(rng, n_ep, start_us, end_us, max_len_us=2 * _US_PER_H, night_share=0.5)
    trio = w.online[rng.integers(0, len(w.online), (n_ep, 3))]
    n_used = rng.integers(1, 4, n_ep)
    col = (rng.random(n) * n_used[ep]).astype(np.int64)
    merchant = np.where(is_cash_out, w.online_shopping[rng.integers(0, len(w.online_shopping), n)],
                        trio[ep, col])
    amount = np.where(is_cash_out, np.minimum(np.rint(rng.lognormal(np.log(60_000), 0.6, n)), 500_000),
                      rng.integers(50, 301, n)).astype(np.int64)
    ev = _Events(starts[ep] + offset, cards[ep], merchant, amount, np.full(n, _CT, dtype=np.int8))
    return ev.take(slice(0, budget))


def _plan_account_takeover(rng: np.random.Generator, w: _World, budget: int, cards: np.ndarray,
                           start_us: int, end_us: int) -> _Events:
    cand = budget // 3 + 1
    sizes = rng.integers(3, 13, cand)
    n_ep = min(_episodes_for_budget(sizes, budget), cand)
    sizes = sizes[:n_ep]
    ep, _ = _within_episode_offsets(sizes)
    n = len(ep)
    duration = rng.uniform(1.0, 6.0, n_ep) * _US_PER_H
    offset = rng.random(n) * duration[ep]
    offset = offset[np.lexsort((offset, ep))].astype(np.int64)  # ep is sorted: sorts within episodes
    starts = _episode_starts(rng, n_ep, start_us, end_us, max_len_us=6 * _US_PER_H, night_share=0.3)
    ep_card = cards[:n_ep]
    home = w.c_city[ep_card]
    target = w.far[home, (rng.random(n_ep) * w.far_n[home]).astype(np.int64)]
    card = ep_card[ep]
    merchant = w.pick_uniform(rng, target[ep])
    cat = w.m_cat[merchant]
    usual = np.exp(_CAT_LOG_MEDIAN[cat] + w.c_log_scale[card])
    amount = _finish_amounts(usual * rng.uniform(3.0, 10.0, n), cat, floor=500)
    ev = _Events(starts[ep] + offset, card, merchant, amount, np.full(n, _ATO, dtype=np.int8))
    return ev.take(slice(0, budget))


def _plan_amount_spike(rng: np.random.Generator, w: _World, budget: int, cards: np.ndarray,
                       start_us: int, end_us: int) -> _Events:
    n = budget
    card = cards[:n]
    t = start_us + (rng.random(n) * (end_us - start_us)).astype(np.int64)
    own = w.c_pref[card, rng.integers(0, _N_PREF, n)].astype(np.int64)
    shop = w.online_shopping[rng.integers(0, len(w.online_shopping), n)]
    merchant = np.where(rng.random(n) < 0.5, own, shop)
    cat = w.m_cat[merchant]
    usual = np.exp(np.maximum(_CAT_LOG_MEDIAN[cat], np.log(5_000.0)) + w.c_log_scale[card])
    amount = _finish_amounts(usual * rng.uniform(8.0, 30.0, n), cat, floor=5_000)
    return _Events(t, card, merchant, amount, np.full(n, _SPIKE, dtype=np.int8))


def _plan_merchant_compromise(rng: np.random.Generator, w: _World, budget: int,
                              start_us: int, end_us: int) -> tuple[_Events, _Events]:
    """(fraud events, genuine visits at the compromised merchants)."""
    n_cards = len(w.c_city)
    span = end_us - start_us
    n_comp = max(1, round(budget / 80))
    # popular in-person merchants in US cities
    us_lo, us_hi = w.group_lo[0], w.group_hi[_N_CITIES - 1]
    domestic_m = np.arange(us_lo, us_hi)
    domestic_m = domestic_m[_CITY_DOMESTIC[np.searchsorted(w.group_hi, domestic_m, side="right")]]
    pop = np.diff(w.cum_pop)[domestic_m]
    comp = rng.choice(domestic_m, size=min(n_comp, len(domestic_m)), replace=False, p=pop / pop.sum())
    per = np.full(len(comp), budget // len(comp))
    per[: budget % len(comp)] += 1
    merchant_city = np.searchsorted(w.group_hi, comp, side="right")
    frauds: list[_Events] = []
    visits: list[_Events] = []
    for j, m in enumerate(comp.tolist()):
        b = int(per[j])
        if b <= 0:
            continue
        n_frauds = rng.integers(1, 4, b)  # frauds per affected card
        n_aff = min(_episodes_for_budget(n_frauds, b), b)
        n_frauds = n_frauds[:n_aff]
        n_visit = math.ceil(n_aff / 0.7)
        local = np.flatnonzero(w.c_city == merchant_city[j])
        k = min(n_visit, len(local))
        vcards = rng.choice(local, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
        if k < n_visit:
            vcards = np.concatenate([vcards, rng.integers(0, n_cards, n_visit - k)])
        w_start = start_us + int(rng.random() * 0.6 * span)
        w_len = int(min(rng.uniform(3, 14) * _US_PER_DAY, end_us - w_start))
        vtime = w_start + (rng.random(n_visit) * w_len).astype(np.int64)
        vmerch = np.full(n_visit, m, dtype=np.int64)
        visits.append(_Events(vtime, vcards, vmerch, _genuine_amounts(rng, w, vcards, vmerch),
                              np.full(n_visit, _GENUINE, dtype=np.int8)))
        # the first n_aff visitors (random order) see fraud 2-20 days later, elsewhere
        ep, pos = _within_episode_offsets(n_frauds)
        n = len(ep)
        delay = (rng.uniform(2.0, 20.0, n_aff) * _US_PER_DAY).astype(np.int64)
        first = vtime[:n_aff] + delay
        late = first >= end_us - 4 * _US_PER_H
        room = np.maximum(end_us - 4 * _US_PER_H - vtime[:n_aff], 1)
        first = np.where(late, vtime[:n_aff] + (rng.uniform(0.3, 1.0, n_aff) * room).astype(np.int64), first)
        step = np.where(pos == 0, 0, (rng.uniform(5.0, 90.0, n) * _US_PER_MIN).astype(np.int64))
        cum = np.cumsum(step)
        starts_idx = np.cumsum(n_frauds) - n_frauds
        t = first[ep] + cum - cum[starts_idx][ep]
        card = vcards[:n_aff][ep]
        other_city = (w.c_city[card] + rng.integers(1, _N_CITIES, n)) % _N_CITIES
        elsewhere = np.where(rng.random(n) < 0.6, _ONLINE_GROUP, other_city)
        merchant = w.pick_weighted(rng, elsewhere)
        again = merchant == m  # (a visitor from another city) never at the compromised merchant
        if again.any():
            merchant[again] = w.pick_weighted(rng, np.full(int(again.sum()), _ONLINE_GROUP))
        cat = w.m_cat[merchant]
        amount = _finish_amounts(rng.lognormal(np.log(25_000), 0.8, n), cat, floor=1_000)
        frauds.append(_Events(t, card, merchant, amount, np.full(n, _MC, dtype=np.int8)))
    return _Events.concat(frauds).take(slice(0, budget)), _Events.concat(visits)


def _split_budget(total: int) -> list[int]:
    raw = [total * s for s in _PATTERN_SHARES]
    out = [int(math.floor(r)) for r in raw]
    rest = total - sum(out)
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[:rest]:
        out[i] += 1
    return out


def _plan(rng: np.random.Generator, w: _World, *, events: int, fraud_rate: float,
          start_us: int, end_us: int) -> _Events:
    """Every fraud event plus the genuine visits tied to merchant compromises, sorted by time."""
    total = int(round(fraud_rate * events))
    if total <= 0:
        return _Events.empty()
    b_ct, b_ato, b_spike, b_mc = _split_budget(total)
    n_cards = len(w.c_city)
    # distinct cards for card testing / takeover / spikes while there are enough of them
    need = b_ct + b_ato + b_spike
    pool = np.resize(rng.permutation(n_cards), max(need, 1))
    parts = [
        _plan_card_testing(rng, w, b_ct, pool[:b_ct], start_us, end_us) if b_ct else _Events.empty(),
        _plan_account_takeover(rng, w, b_ato, pool[b_ct:b_ct + b_ato], start_us, end_us)
        if b_ato else _Events.empty(),
        _plan_amount_spike(rng, w, b_spike, pool[b_ct + b_ato:need], start_us, end_us)
        if b_spike else _Events.empty(),
    ]
    if b_mc:
        mc_fraud, mc_visits = _plan_merchant_compromise(rng, w, b_mc, start_us, end_us)
        parts += [mc_fraud, mc_visits]
    ev = _Events.concat(parts)
    ev.time = np.clip(ev.time, start_us, end_us - 1)
    ev = ev.take(np.argsort(ev.time, kind="stable"))
    if len(ev) > events:
        _LOG.warning("planned %d fraud-related events for only %d events; keeping the first %d",
                     len(ev), events, events)
        ev = ev.take(slice(0, events))
    return ev


# ---------------------------------------------------------------------------------- time profile


def _minute_intensity(start_us: int, n_minutes: int) -> np.ndarray:
    t = start_us + np.arange(n_minutes, dtype=np.int64) * _US_PER_MIN
    hour = (t % _US_PER_DAY) / _US_PER_H
    diurnal = np.interp(hour, np.arange(24) + 0.5, _HOURLY, period=24)
    weekday = (t // _US_PER_DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday == 0
    return diurnal * _WEEKDAY[weekday]


def _is_weekend(t_us: np.ndarray) -> np.ndarray:
    return (t_us // _US_PER_DAY + 3) % 7 >= 5


# ---------------------------------------------------------------------------------- chunks


def _genuine_chunk(rng: np.random.Generator, w: _World, minutes: np.ndarray, counts: np.ndarray,
                   start_us: int) -> _Events:
    n = int(counts.sum())
    minute = np.repeat(minutes, counts)
    t = start_us + minute * _US_PER_MIN + rng.integers(0, _US_PER_MIN, n)
    card = np.searchsorted(w.c_cum_rate, rng.random(n) * w.c_cum_rate[-1], side="right")
    card = np.minimum(card, len(w.c_cum_rate) - 1)
    weekend = _is_weekend(t)
    explore_p = np.where(weekend, 0.22, 0.12)
    r = rng.random(n)
    u = rng.random(n).astype(np.float32)
    slot = np.minimum((w.c_pref_cum[card] < u[:, None]).sum(axis=1), _N_PREF - 1)
    merchant = w.c_pref[card, slot].astype(np.int64)
    explore = r < explore_p
    if explore.any():
        idx = np.flatnonzero(explore)
        online = r[idx] < explore_p[idx] * 0.3
        groups = np.where(online, _ONLINE_GROUP, w.c_city[card[idx]])
        merchant[idx] = w.pick_weighted(rng, groups)
    on_trip = (t >= w.c_trip_start[card]) & (t < w.c_trip_end[card])
    on_trip &= _CAT_CHANNEL[w.m_cat[merchant]] != _ONLINE
    if on_trip.any():
        idx = np.flatnonzero(on_trip)
        merchant[idx] = w.pick_weighted(rng, w.c_trip_city[card[idx]])
    amount = _genuine_amounts(rng, w, card, merchant, np.where(weekend, 1.1, 1.0))
    return _Events(t, card, merchant, amount, np.full(n, _GENUINE, dtype=np.int8))


def _txn_ids(rng: np.random.Generator, index: np.ndarray, key: tuple[int, int]) -> pa.Array:
    """``t`` + 4 random hex digits + 16 hex digits of a keyed bijective mix of the row index."""
    x = index.astype(np.uint64) + np.uint64(key[0])
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    x ^= np.uint64(key[1])
    salt = rng.integers(0, 1 << 16, len(index), dtype=np.uint64)
    chars = np.empty((len(index), 21), dtype=np.uint8)
    chars[:, 0] = ord("t")
    chars[:, 1:5] = _hex(salt, 2)
    chars[:, 5:] = _hex(x, 8)
    return _fixed_width_strings(chars)


_CATEGORY_ARR = pa.array(CATEGORIES, pa.string())
_CHANNEL_ARR = pa.array(CHANNELS, pa.string())
_CURRENCY_ARR = pa.array(_CURRENCIES, pa.string())
_PATTERN_ARR = pa.array(FRAUD_PATTERNS, pa.string())


def _to_table(ev: _Events, w: _World, txn_id: pa.Array) -> pa.Table:
    cat = w.m_cat[ev.merchant]
    m_lat = w.m_lat[ev.merchant]
    m_lon = w.m_lon[ev.merchant]
    no_loc = np.isnan(m_lat)
    fraud = ev.pattern >= 0
    idx_m = pa.array(ev.merchant)
    idx_c = pa.array(ev.card)
    arrays = [
        txn_id,
        w.c_pan.take(idx_c),
        w.m_id.take(idx_m),
        _CATEGORY_ARR.take(pa.array(cat)),
        pa.array(ev.amount, pa.int64()),
        _CURRENCY_ARR.take(pa.array(w.m_currency[ev.merchant])),
        pa.array(ev.time, pa.timestamp("us", tz="UTC")),
        _CHANNEL_ARR.take(pa.array(_CAT_CHANNEL[cat])),
        pa.array(w.c_lat[ev.card], pa.float64()),
        pa.array(w.c_lon[ev.card], pa.float64()),
        pa.array(m_lat, pa.float64(), mask=no_loc),
        pa.array(m_lon, pa.float64(), mask=no_loc),
        pa.array(fraud, pa.bool_()),
        _PATTERN_ARR.take(pa.array(ev.pattern.astype(np.int32), mask=~fraud)),
    ]
    return pa.Table.from_arrays(arrays, schema=GENERATED_SCHEMA)


# ---------------------------------------------------------------------------------- writers


def _iso_utc(t_us: np.ndarray) -> pa.Array:
    """µs since the epoch to ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` strings (vectorized, fixed width)."""
    n = len(t_us)
    day = t_us // _US_PER_DAY
    rem = t_us - day * _US_PER_DAY
    days, inv = np.unique(day, return_inverse=True)
    date_txt = np.datetime_as_string(days.astype("datetime64[D]"), unit="D").astype("S10")
    chars = np.empty((n, 27), dtype=np.uint8)
    chars[:, :10] = date_txt.view(np.uint8).reshape(-1, 10)[inv.reshape(-1)]
    chars[:, 10] = ord("T")
    chars[:, 13] = ord(":")
    chars[:, 16] = ord(":")
    chars[:, 19] = ord(".")
    chars[:, 26] = ord("Z")
    secs, frac = np.divmod(rem, _US_PER_S)
    hh, rest = np.divmod(secs, 3600)
    mm, ss = np.divmod(rest, 60)
    zero = ord("0")
    for col, value, width in ((11, hh, 2), (14, mm, 2), (17, ss, 2), (20, frac, 6)):
        for k in range(width):
            chars[:, col + width - 1 - k] = value % 10 + zero
            value = value // 10
    return _fixed_width_strings(chars)


def _json_number(arr: pa.Array) -> pa.Array:
    return pc.fill_null(pc.cast(arr, pa.string()), "null")


_JSON_BOOL = pa.array(["false", "true"], pa.string())
_JSON_PATTERN = pa.array(["null", *(f'"{p}"' for p in FRAUD_PATTERNS)], pa.string())


def _jsonl_bytes(table: pa.Table, ev: _Events) -> list[memoryview]:
    """JSON Lines of ``table`` (all strings are plain ASCII identifiers: no escaping needed)."""
    out: list[memoryview] = []
    for lo in range(0, table.num_rows, _JSONL_SLICE):
        t = table.slice(lo, _JSONL_SLICE)
        sl = slice(lo, lo + t.num_rows)
        col = {name: t.column(name).combine_chunks() for name in t.column_names}
        line = pc.binary_join_element_wise(
            '{"txn_id":"', col["txn_id"],
            '","card_number":"', col["card_number"],
            '","merchant_id":"', col["merchant_id"],
            '","merchant_category":"', col["merchant_category"],
            '","amount_minor":', pc.cast(col["amount_minor"], pa.string()),
            ',"currency":"', col["currency"],
            '","event_time":"', _iso_utc(ev.time[sl]),
            '","channel":"', col["channel"],
            '","card_lat":', _json_number(col["card_lat"]),
            ',"card_lon":', _json_number(col["card_lon"]),
            ',"merchant_lat":', _json_number(col["merchant_lat"]),
            ',"merchant_lon":', _json_number(col["merchant_lon"]),
            ',"is_fraud":', _JSON_BOOL.take(pa.array((ev.pattern[sl] >= 0).astype(np.int8))),
            ',"fraud_pattern":', _JSON_PATTERN.take(pa.array(ev.pattern[sl].astype(np.int32) + 1)),
            "}\n",
            "",
        )
        offsets = np.frombuffer(line.buffers()[1], dtype=np.int32)
        a, b = int(offsets[line.offset]), int(offsets[line.offset + len(line)])
        out.append(memoryview(line.buffers()[2])[a:b])
    return out


# low-cardinality columns worth dictionary-encoding (txn ids and times never repeat enough)
_DICTIONARY_COLUMNS = tuple(n for n in GENERATED_SCHEMA.names if n not in ("txn_id", "event_time", "amount_minor"))


class _Sink:
    """Parquet (zstd, one row group per chunk) or JSON Lines, written to ``<out>.partial`` then renamed."""

    def __init__(self, path: Path, fmt: Literal["parquet", "jsonl"]) -> None:
        self.path = path
        self.fmt = fmt
        self.tmp = path.with_name(path.name + ".partial")
        self._pq: pq.ParquetWriter | None = None
        self._fh: BinaryIO | None = None
        if fmt == "parquet":
            self._pq = pq.ParquetWriter(str(self.tmp), GENERATED_SCHEMA, compression="zstd",
                                        use_dictionary=list(_DICTIONARY_COLUMNS))
        else:
            self._fh = open(self.tmp, "wb")

    def write(self, table: pa.Table, ev: _Events) -> None:
        if self._pq is not None:
            self._pq.write_table(table, row_group_size=max(table.num_rows, 1))
        else:
            assert self._fh is not None
            for piece in _jsonl_bytes(table, ev):
                self._fh.write(piece)

    def close(self, ok: bool) -> None:
        if self._pq is not None:
            self._pq.close()
        if self._fh is not None:
            self._fh.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- entry point


def _parse_start(start: datetime | str) -> datetime:
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if not isinstance(start, datetime):
        raise TypeError(f"start must be a datetime or an ISO-8601 string, not {type(start).__name__}")
    if start.tzinfo is None:
        return start.replace(tzinfo=timezone.utc)
    return start.astimezone(timezone.utc)


def _chunk_bounds(counts: np.ndarray, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive minute ranges holding at most ``chunk_size`` events (unless one minute has more)."""
    cum = np.cumsum(counts)
    bounds: list[tuple[int, int]] = []
    a, done, n = 0, 0, len(counts)
    while a < n:
        b = int(np.searchsorted(cum, done + chunk_size, side="right"))
        b = max(b, a + 1)
        if int(cum[-1]) == int(cum[b - 1]):
            b = n  # nothing more after b: take the empty tail minutes too
        bounds.append((a, b))
        done = int(cum[b - 1])
        a = b
    return bounds


def generate(*, out: str | os.PathLike, events: int, seed: int = 7, start: datetime | str = "2024-01-01",
             days: int = 60, cards: int | None = None, merchants: int | None = None,
             fraud_rate: float = 0.01, time_resolution: Literal["us", "s"] = "s",
             chunk_size: int = 200_000, progress: bool = False) -> GenerateSummary:
    """Write ``events`` synthetic card transactions to ``out`` (``.parquet`` or ``.jsonl``).

    Events cover ``[start, start + days)`` in non-decreasing event-time order. See the module
    docstring for the behaviour simulated. Deterministic for a given seed and arguments.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"out must end in '.parquet' or '.jsonl', got {os.fspath(out)!r}")
    fmt: Literal["parquet", "jsonl"] = "parquet" if suffix == ".parquet" else "jsonl"
    if isinstance(events, bool) or int(events) != events or events < 0:
        raise ValueError(f"events must be a non-negative integer, got {events!r}")
    events = int(events)
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if not 0.0 <= fraud_rate <= 0.5:
        raise ValueError(f"fraud_rate must be within [0, 0.5], got {fraud_rate!r}")
    if time_resolution not in ("us", "s"):
        raise ValueError(f"time_resolution must be 'us' or 's', got {time_resolution!r}")
    n_cards = max(100, events // 50) if cards is None else int(cards)
    n_merchants = max(50, events // 1000) if merchants is None else int(merchants)
    if n_cards < 1:
        raise ValueError(f"cards must be >= 1, got {cards!r}")
    if n_merchants < _MIN_MERCHANTS:
        raise ValueError(f"merchants must be >= {_MIN_MERCHANTS}, got {merchants!r}")
    t0 = _parse_start(start)
    t1 = t0 + timedelta(days=days)
    start_us = (t0 - _EPOCH) // timedelta(microseconds=1)
    end_us = (t1 - _EPOCH) // timedelta(microseconds=1)

    rng = np.random.default_rng(seed)
    world = _build_world(rng, n_cards=n_cards, n_merchants=n_merchants, start_us=start_us, end_us=end_us)
    planned = _plan(rng, world, events=events, fraud_rate=fraud_rate, start_us=start_us, end_us=end_us)
    id_key = (int(rng.integers(0, 2**63)), int(rng.integers(0, 2**63)))

    n_minutes = days * 1440
    intensity = _minute_intensity(start_us, n_minutes)
    background = rng.multinomial(events - len(planned), intensity / intensity.sum())
    planned_minute = (planned.time - start_us) // _US_PER_MIN
    counts = background + np.bincount(planned_minute, minlength=n_minutes)
    bounds = _chunk_bounds(counts, chunk_size) if events else []
    _LOG.info("generating %d events (%d planned fraud-related) for %d cards, %d merchants in %d chunks -> %s",
              events, len(planned), n_cards, n_merchants, len(bounds), path)

    path.parent.mkdir(parents=True, exist_ok=True)
    by_pattern = dict.fromkeys(FRAUD_PATTERNS, 0)
    written = 0
    sink = _Sink(path, fmt)
    ok = False
    try:
        with tqdm(total=events, unit="ev", unit_scale=True, disable=not progress, file=sys.stderr,
                  desc=path.name) as bar:
            for a, b in bounds:
                minutes = np.arange(a, b, dtype=np.int64)
                genuine = _genuine_chunk(rng, world, minutes, background[a:b], start_us)
                lo, hi = np.searchsorted(planned_minute, [a, b], side="left")
                ev = _Events.concat([genuine, planned.take(slice(int(lo), int(hi)))])
                ev = ev.take(np.argsort(ev.time, kind="stable"))
                if time_resolution == "s":
                    ev.time = ev.time - ev.time % _US_PER_S
                ids = _txn_ids(rng, np.arange(written, written + len(ev), dtype=np.int64), id_key)
                table = _to_table(ev, world, ids)
                sink.write(table, ev)
                codes = np.bincount(ev.pattern[ev.pattern >= 0], minlength=len(FRAUD_PATTERNS))
                for name, c in zip(FRAUD_PATTERNS, codes.tolist()):
                    by_pattern[name] += c
                written += len(ev)
                _LOG.debug("chunk minutes [%d, %d): %d events", a, b, len(ev))
                bar.update(len(ev))
        ok = True
    finally:
        sink.close(ok)
    if written != events:  # pragma: no cover - guarded by construction
        raise RuntimeError(f"wrote {written} events, expected {events}")
    frauds = sum(by_pattern.values())
    _LOG.info("wrote %d events (%d fraud: %s) to %s", written, frauds, by_pattern, path)
    return GenerateSummary(path=os.fspath(out), events=written, frauds=frauds, by_pattern=by_pattern,
                           start=t0, end=t1)
