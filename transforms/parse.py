"""Raw source records to canonical events plus dead letters, a whole batch at a time.

``parse_batch`` is pure: an Arrow table of source columns in, canonical events and dead
letters out. Every row ends up in exactly one of the two, which is what lets a run
reconcile ``rows read = events accepted + dead letters``. The card number is replaced by a
keyed HMAC token here, before anything is stored. Dead letters copy only the columns the
mapping maps onto event fields (the card number as its token), and every piece of text they
hold has card-number-like runs masked (:mod:`finfeat.schemas.redaction`).
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.currencies import ISO_4217
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.events import (
    CHANNELS,
    EVENT_SCHEMA,
    EVENT_TIME_TYPE,
    MAX_ABS_LAT,
    MAX_ABS_LON,
    MAX_AMOUNT_MINOR,
    MAX_EVENT_US,
    MAX_ID_CHARS,
    MIN_EVENT_US,
)
from finfeat.schemas.mapping import Mapping, MappingError
from finfeat.schemas.redaction import CARD_IN_ID_RE2, MAX_PAYLOAD_CHARS, mask_card_numbers, shown

SOURCE_ROW = "_source_row"
SOURCE = "_source"
#: The event columns plus where each row came from (used for the deterministic dedup rule).
PARSED_SCHEMA = pa.schema([*EVENT_SCHEMA, pa.field(SOURCE, pa.string(), nullable=False),
                           pa.field(SOURCE_ROW, pa.int64(), nullable=False)])

_MIN_US = MIN_EVENT_US
_MAX_US = MAX_EVENT_US
_EPOCH_UNITS = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


class CardTokenizer:
    """Keyed HMAC-SHA256 of the card number's digits; the same key gives the same token."""

    #: tokens remembered across batches (a card repeats in every batch); cleared when full
    CACHE_SIZE = 200_000

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the tokenization key must be at least 16 bytes; set FINFEAT_TOKEN_KEY "
                             "to a secret of at least 16 bytes")
        self._key = key
        self._known: dict[str, str] = {}

    def token(self, digits: str) -> str:
        return "tok_" + hmac.digest(self._key, digits.encode(), "sha256").hex()[:32]

    def _cached(self, digits: str) -> str:
        tok = self._known.get(digits)
        if tok is None:
            if len(self._known) >= self.CACHE_SIZE:
                self._known.clear()
            tok = self._known[digits] = self.token(digits)
        return tok

    def tokens(self, digits: pa.Array) -> pa.Array:
        """Vectorized over the distinct numbers of a batch."""
        encoded = pc.dictionary_encode(digits).combine_chunks() if isinstance(digits, pa.ChunkedArray) \
            else pc.dictionary_encode(digits)
        tokens = pa.array([self._cached(d) if d is not None else None for d in encoded.dictionary.to_pylist()],
                          pa.string())
        return tokens.take(encoded.indices)


@dataclass
class _Problems:
    reason: np.ndarray  # object array: None or a reason code
    detail: np.ndarray

    @classmethod
    def new(cls, n: int) -> _Problems:
        return cls(np.full(n, None, dtype=object), np.full(n, None, dtype=object))

    def flag(self, mask: np.ndarray | pa.Array, reason: str, detail: str, values: pa.Array | None = None) -> None:
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.fill_null(False).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(mask)  # few rows, usually none: only they are compared with the reasons so far
        rows = rows[self.reason[rows] == None]  # noqa: E711 (element-wise)
        if rows.size == 0:
            return
        self.reason[rows] = reason
        if values is not None:
            values_shown = values.take(pa.array(rows)).to_pylist()
            self.detail[rows] = [f"{detail}: {shown(v)}" for v in values_shown]
        else:
            self.detail[rows] = detail

    @property
    def ok(self) -> np.ndarray:
        return self.reason == None  # noqa: E711


def _col(raw: pa.Table, name: str) -> pa.Array:
    if name not in raw.column_names:
        cols = [c for c in raw.column_names if not c.startswith("_")]
        raise MappingError(f"the mapping reads column {name!r}, which the input does not have; "
                           f"its columns are {cols}")
    return raw.column(name).combine_chunks()


def _text(arr: pa.Array) -> pa.Array:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return pc.utf8_trim_whitespace(arr.cast(pa.string()))
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    return arr.cast(pa.string())


def _missing(arr: pa.Array) -> np.ndarray:
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type)):
        # a typed column (number, time, boolean) is missing only where null: no text to trim
        return pc.is_null(arr).to_numpy(zero_copy_only=False)
    text = _text(arr)
    return pc.or_(pc.is_null(text), pc.equal(text, "")).fill_null(True).to_numpy(zero_copy_only=False)


_OUT_OF_RANGE = f"is above the largest amount accepted, {MAX_AMOUNT_MINOR:,} minor units"


def _parse_amount(arr: pa.Array, scale: int, p: _Problems, name: str) -> np.ndarray:
    """Minor units; negative, non-finite, too precise and out-of-range amounts flagged
    (at most :data:`MAX_AMOUNT_MINOR`, checked before any multiplication so nothing wraps)."""
    n = len(arr)
    minor = np.zeros(n, dtype=np.int64)
    typ = arr.type
    limit = MAX_AMOUNT_MINOR // 10 ** scale  # largest whole source value within the bound
    if pa.types.is_integer(typ):
        v = arr.fill_null(0).to_numpy()
        if v.dtype == np.uint64:  # above int64: out of range, not negative
            v = np.minimum(v, np.uint64(limit + 1))
        v = v.astype(np.int64)
        p.flag(v < 0, "negative_amount", f"{name} is negative", arr)
        p.flag(v > limit, "amount_out_of_range", f"{name} {_OUT_OF_RANGE}", arr)
        inside = (v >= 0) & (v <= limit)
        minor[inside] = v[inside] * (10 ** scale)
        return minor
    if pa.types.is_floating(typ):
        v = arr.fill_null(0.0).to_numpy().astype(np.float64)
        finite = np.isfinite(v)
        p.flag(~finite, "non_finite_amount", f"{name} is not finite", arr)
        p.flag(finite & (v < 0), "negative_amount", f"{name} is negative", arr)
        scaled = np.where(finite, v, 0.0) * (10 ** scale)
        p.flag(scaled > MAX_AMOUNT_MINOR, "amount_out_of_range", f"{name} {_OUT_OF_RANGE}", arr)
        scaled = np.where(np.abs(scaled) <= MAX_AMOUNT_MINOR, scaled, 0.0)
        rounded = np.rint(scaled)
        p.flag(np.abs(scaled - rounded) > 1e-6, "amount_precision",
               f"{name} has more than {scale} decimals", arr)
        minor[:] = rounded.astype(np.int64)
        return minor
    text = _text(arr)
    lowered = pc.utf8_lower(text)
    p.flag(pc.is_in(lowered, pa.array(sorted(_NON_FINITE))), "non_finite_amount", f"{name} is not finite", arr)
    parts = pc.extract_regex(text, r"^(?P<sign>[+-]?)0*(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]*))?$")
    matched = pc.is_valid(parts).to_numpy(zero_copy_only=False)
    p.flag(~matched & ~_missing(arr), "wrong_type", f"{name} is not a decimal number", arr)
    if not matched.any():
        return minor
    sign = pc.struct_field(parts, "sign").fill_null("")
    ints = pc.struct_field(parts, "int").fill_null("0")
    # more whole digits than the bound has: out of range, and kept away from the int64 cast
    too_long = pc.greater(pc.utf8_length(ints), len(str(limit))).to_numpy(zero_copy_only=False)
    minus = pc.equal(sign, "-").to_numpy(zero_copy_only=False)
    p.flag(too_long & minus, "negative_amount", f"{name} is negative", arr)
    p.flag(too_long, "amount_out_of_range", f"{name} {_OUT_OF_RANGE}", arr)
    if too_long.any():
        ints = pc.if_else(pa.array(too_long), pa.scalar("0"), ints)
        matched = matched & ~too_long
    frac = pc.struct_field(parts, "frac").fill_null("")
    frac_kept = pc.utf8_slice_codeunits(frac, 0, scale) if scale else pa.array([""] * n)
    frac_rest = pc.utf8_slice_codeunits(frac, scale)
    too_precise = pc.match_substring_regex(frac_rest, "[1-9]")
    p.flag(too_precise, "amount_precision", f"{name} has more than {scale} decimals", arr)
    padded = pc.utf8_rpad(frac_kept, scale, "0") if scale else frac_kept
    whole = pc.cast(pc.binary_join_element_wise(ints, padded, ""), pa.int64())
    values = whole.to_numpy(zero_copy_only=False)
    negative = pc.equal(sign, "-").to_numpy(zero_copy_only=False) & (values != 0)
    p.flag(negative, "negative_amount", f"{name} is negative", arr)
    p.flag(matched & (values > MAX_AMOUNT_MINOR), "amount_out_of_range", f"{name} {_OUT_OF_RANGE}", arr)
    minor[matched] = values[matched]
    return minor


def _iso_fallback(text: pa.Array, zone: ZoneInfo) -> pa.Array:
    out: list[int | None] = []
    for s in text.to_pylist():
        try:
            dt = datetime.fromisoformat(s) if s else None
        except ValueError:
            dt = None
        if dt is None:
            out.append(None)
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=zone)
        delta = dt.astimezone(timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
        out.append((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
    return pa.array(out, pa.int64()).cast(EVENT_TIME_TYPE)


def _localize(naive: pa.Array, zone: str) -> pa.Array:
    if zone == "UTC":
        return naive.cast(pa.timestamp("us")).cast(pa.int64()).cast(EVENT_TIME_TYPE)
    return pc.assume_timezone(naive.cast(pa.timestamp("us")), zone, ambiguous="earliest",
                              nonexistent="earliest").cast(EVENT_TIME_TYPE)


_FIXED_WIDTH = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2, "y": 2, "j": 3, "I": 2, "%": 1}
_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def _date_offsets(fmt: str) -> dict[str, int] | None:
    """Where a zero-padded text in ``fmt`` has its year (%Y), month (%m) and day (%d), when
    every directive before them has a fixed width; else None."""
    found: dict[str, int] = {}
    pos, i = 0, 0
    while i < len(fmt) and len(found) < 3:
        if fmt[i] != "%":
            pos, i = pos + 1, i + 1
            continue
        directive = fmt[i + 1:i + 2]
        if directive in ("Y", "m", "d"):
            found[directive] = pos
        elif directive not in _FIXED_WIDTH:
            return None
        pos, i = pos + _FIXED_WIDTH[directive], i + 2
    return found if len(found) == 3 else None


def _rolled_over(text: pa.Array, parsed: pa.Array, fmt: str) -> np.ndarray:
    """Rows whose text names a day the month does not have (``2021-02-29``, ``06-31``).

    Arrow's ``strptime`` accepts day 1-31 in any month and carries the excess into the next
    month, so such a date parses as day 1-3 of the month after (with an offset, %z, its UTC
    day is 28-31 or 1-4). Only those rows are looked at: where the format puts year, month and
    day at fixed places, their text's day is checked against its month's length, vectorized;
    rows whose text is not laid out that way are read by Python's ``strptime``, which refuses a
    day beyond the month's end.
    """
    bad = np.zeros(len(text), dtype=bool)
    if "%d" not in fmt and "%e" not in fmt:
        return bad
    day = pc.day(parsed).fill_null(0).to_numpy(zero_copy_only=False)
    maybe = (day >= 1) & (day <= 4)
    if parsed.type.tz:
        maybe |= day >= 28
    rows = np.flatnonzero(maybe)
    if rows.size == 0:
        return bad
    offsets = _date_offsets(fmt)
    if offsets is not None:
        sub = text.take(pa.array(rows, pa.int64()))

        def number(field: str, width: int) -> np.ndarray:
            part = pc.utf8_slice_codeunits(sub, offsets[field], offsets[field] + width)
            digits = pc.match_substring_regex(part, rf"^[0-9]{{{width}}}$").fill_null(False)
            return pc.if_else(digits, part, pa.scalar(None, pa.string())).cast(pa.int64()).fill_null(-1) \
                .to_numpy(zero_copy_only=False)

        y, m, d = number("Y", 4), number("m", 2), number("d", 2)
        laid_out = (y >= 0) & (m >= 1) & (m <= 12) & (d >= 1)
        mm = np.clip(m, 1, 12) - 1
        leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
        length = _DAYS_IN_MONTH[mm] + ((mm == 1) & leap)
        bad[rows[laid_out & (d > length)]] = True
        rows = rows[~laid_out]
    for i, value in zip(rows, text.take(pa.array(rows, pa.int64())).to_pylist()):
        try:
            datetime.strptime(value, fmt)
        except ValueError as exc:
            bad[i] = "day is out of range for month" in str(exc)
    return bad


def _parse_time(arr: pa.Array, fmt: str, zone: str, p: _Problems, name: str) -> np.ndarray:
    typ = arr.type
    if pa.types.is_timestamp(typ):
        ts = arr.cast(EVENT_TIME_TYPE) if typ.tz else _localize(arr, zone)
    elif fmt in _EPOCH_UNITS:
        if pa.types.is_integer(typ):
            ints = arr.cast(pa.int64())
        else:
            text = _text(arr)
            good = pc.match_substring_regex(text, r"^-?[0-9]{1,16}$").fill_null(False)
            ints = pc.if_else(good, text, pa.scalar(None, pa.string())).cast(pa.int64())
        ts = pc.multiply(ints, _EPOCH_UNITS[fmt]).cast(EVENT_TIME_TYPE)
    else:
        text = _text(arr)
        if fmt == "iso8601":
            try:
                ts = text.cast(EVENT_TIME_TYPE)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                try:
                    ts = _localize(text.cast(pa.timestamp("us")), zone)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    ts = _iso_fallback(text, ZoneInfo(zone))
        else:
            naive = pc.strptime(text, format=fmt, unit="us", error_is_null=True)
            rolled = _rolled_over(text, naive, fmt)
            if rolled.any():
                naive = pc.if_else(pa.array(rolled), pa.scalar(None, naive.type), naive)
            ts = naive.cast(EVENT_TIME_TYPE) if naive.type.tz else _localize(naive, zone)
    us = ts.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
    bad = pc.is_null(ts).to_numpy(zero_copy_only=False) | (us < _MIN_US) | (us >= _MAX_US)
    p.flag(bad, "bad_timestamp", f"{name} is not a time in format {fmt} ({zone}) between 1970 and 2100", arr)
    return us


def _parse_float(arr: pa.Array, p: _Problems, name: str, bound: float) -> pa.Array:
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_decimal(arr.type):
        vals = arr.cast(pa.float64())
    else:
        text = _text(arr)
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        good = pc.match_substring_regex(text, r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
        p.flag(pc.invert(good.fill_null(True)), "wrong_type", f"{name} is not a number", arr)
        vals = pc.if_else(good.fill_null(False), text, pa.scalar(None, pa.string())).cast(pa.float64())
    v = vals.fill_null(0.0).to_numpy(zero_copy_only=False)
    p.flag(~np.isfinite(v) | (np.abs(v) > bound), "bad_coordinates", f"{name} is outside +-{bound:g}", arr)
    return vals


def _parse_label(arr: pa.Array, true_values: list[str], false_values: list[str], p: _Problems,
                 name: str) -> pa.Array:
    if pa.types.is_boolean(arr.type):
        return arr
    text = _text(arr)
    is_true = pc.is_in(text, pa.array(true_values))
    is_false = pc.is_in(text, pa.array(false_values))
    empty = _missing(arr)
    p.flag(~empty & ~pc.or_(is_true, is_false).fill_null(False).to_numpy(zero_copy_only=False), "wrong_type",
           f"{name} is none of {true_values + false_values}", arr)
    return pc.if_else(pa.array(empty), pa.scalar(None, pa.bool_()), is_true)


def _channel(raw: pa.Table, mapping: Mapping) -> pa.Array:
    n = raw.num_rows
    spec = mapping.fields.channel
    if spec is None:
        return pa.array(["unknown"] * n, pa.string())
    if spec.constant is not None:
        return pa.array([spec.constant] * n, pa.string())
    encoded = pc.dictionary_encode(_text(_col(raw, spec.column)))

    def pick(value: str | None) -> str:
        if value is None:
            return spec.default
        if value in spec.map:
            return spec.map[value]
        for suffix, channel in spec.suffix_map.items():
            if value.endswith(suffix):
                return channel
        return value if value in CHANNELS and not spec.map and not spec.suffix_map else spec.default

    labels = pa.array([pick(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return labels.take(encoded.indices).fill_null(spec.default)


_MAX_PAYLOAD_VALUE = 1000


def _payload_value(value: object) -> object:
    if isinstance(value, str) and len(value) > _MAX_PAYLOAD_VALUE:
        return f"{value[:_MAX_PAYLOAD_VALUE]}... ({len(value):,} chars)"
    return value


def redacted_payloads(raw: pa.Table, rows: np.ndarray, mapping: Mapping, tokens: pa.Array | None) -> list[str]:
    """JSON of the record's safe columns (:meth:`Mapping.safe_columns`: the ones mapped onto
    event fields) and the card's token; nothing else of the record is copied.
    :func:`make_dead_letters` masks card-number-like runs in it."""
    keep = [c for c in mapping.safe_columns() if c in raw.column_names]
    records = raw.select(keep).take(pa.array(rows, pa.int64())).to_pylist()
    if tokens is not None:
        for rec, tok in zip(records, tokens.take(pa.array(rows, pa.int64())).to_pylist()):
            rec["card_token"] = tok
    return [json.dumps({k: _payload_value(v) for k, v in r.items()}, default=str, sort_keys=True)
            for r in records]


def _check_ids(texts: dict[str, pa.Array], mapping: Mapping, p: _Problems) -> None:
    """Mapped text columns that reach the feature table (``texts``: field -> trimmed text): too
    long, or holding a card number (a misaligned or swapped row, or a source that leaks card
    numbers into ids)."""
    for field, spec in mapping.id_columns().items():
        values = texts[field]
        if field != "txn_id":  # few distinct values: test each once
            encoded = pc.dictionary_encode(values)
            values, indices = encoded.dictionary, encoded.indices
        else:
            indices = None

        def per_row(mask: pa.Array) -> pa.Array:
            return mask if indices is None else mask.take(indices)

        p.flag(per_row(pc.greater(pc.utf8_length(values), MAX_ID_CHARS)), "field_too_long",
               f"{field} ({spec.column}) is longer than {MAX_ID_CHARS} characters")
        if not spec.numeric_ids:
            p.flag(per_row(pc.match_substring_regex(values, CARD_IN_ID_RE2)), "card_number_in_field",
                   f"{field} ({spec.column}) holds a card-number-like value (value not shown): a misaligned row, "
                   f"or set numeric_ids: true on fields.{field} if its ids are long numbers")


def parse_batch(raw: pa.Table, *, mapping: Mapping, tokenizer: CardTokenizer, source: str,
                run_id: str, recorded_at_us: int) -> tuple[pa.Table, pa.Table]:
    """Map one batch of source rows to ``(events, dead_letters)``.

    ``raw`` holds the source columns and ``_source_row`` (the record's 0-based number in its
    file). Events follow :data:`PARSED_SCHEMA`; dead letters :data:`DEAD_LETTER_SCHEMA`.
    """
    n = raw.num_rows
    f = mapping.fields
    p = _Problems.new(n)
    required = {"txn_id": f.txn_id.column, "merchant_id": f.merchant_id.column, "amount": f.amount.column,
                "event_time": f.event_time.column}
    card_col = (f.card_number or f.card_token).column
    required["card"] = card_col
    if f.currency.column:
        required["currency"] = f.currency.column
    for label, column in required.items():
        p.flag(_missing(_col(raw, column)), "missing_field", f"{label} ({column}) is missing")
    texts = {field: _text(_col(raw, spec.column)) for field, spec in mapping.id_columns().items()}
    _check_ids(texts, mapping, p)

    card = texts["card_token"] if f.card_token is not None else _text(_col(raw, card_col))
    tokens: pa.Array | None = None
    if f.card_number is not None:
        digits = pc.replace_substring_regex(card, r"[ \-]", "")
        valid_pan = pc.match_substring_regex(digits, r"^[0-9]{10,19}$").fill_null(False)
        p.flag(pc.invert(valid_pan), "wrong_type", f"card number ({card_col}) is not 10-19 digits (value not shown)")
        tokens = tokenizer.tokens(pc.if_else(valid_pan, digits, pa.scalar(None, pa.string())))
    else:
        tokens = card

    amount = _parse_amount(_col(raw, f.amount.column), f.amount.scale, p, f.amount.column)
    event_us = _parse_time(_col(raw, f.event_time.column), f.event_time.format, f.event_time.timezone, p,
                           f.event_time.column)
    if f.currency.constant is not None:
        currency = pa.array([f.currency.constant] * n, pa.string())
    else:
        currency = pc.utf8_upper(_text(_col(raw, f.currency.column)))
        known = pc.is_in(currency, pa.array(sorted(ISO_4217))).fill_null(False)
        p.flag(pc.invert(known), "unknown_currency", "currency is not an ISO-4217 code",
               _col(raw, f.currency.column))
    coords = {}
    for name, bound in (("card_lat", MAX_ABS_LAT), ("card_lon", MAX_ABS_LON), ("merchant_lat", MAX_ABS_LAT),
                        ("merchant_lon", MAX_ABS_LON)):
        spec = getattr(f, name)
        coords[name] = (_parse_float(_col(raw, spec.column), p, spec.column, bound) if spec
                        else pa.nulls(n, pa.float64()))
    label = (_parse_label(_col(raw, f.is_fraud.column), f.is_fraud.true_values, f.is_fraud.false_values, p,
                          f.is_fraud.column) if f.is_fraud else pa.nulls(n, pa.bool_()))
    category = texts["merchant_category"] if f.merchant_category else pa.nulls(n, pa.string())

    ok = p.ok
    keep = pa.array(ok)
    rows = raw.column(SOURCE_ROW).combine_chunks()
    events = pa.Table.from_arrays(
        [
            texts["txn_id"].filter(keep),
            tokens.filter(keep),
            texts["merchant_id"].filter(keep),
            category.filter(keep),
            pa.array(amount[ok], pa.int64()),
            currency.filter(keep),
            pa.array(event_us[ok], pa.int64()).cast(EVENT_TIME_TYPE),
            _channel(raw, mapping).filter(keep),
            *(coords[c].filter(keep) for c in ("card_lat", "card_lon", "merchant_lat", "merchant_lon")),
            label.filter(keep),
            pa.array([source] * int(ok.sum()), pa.string()),
            rows.filter(keep),
        ],
        schema=PARSED_SCHEMA,
    )
    bad = np.flatnonzero(~ok)
    dead = make_dead_letters(
        run_id=run_id, stage="parse", reasons=list(p.reason[bad]), details=list(p.detail[bad]), source=source,
        source_rows=rows.take(pa.array(bad, pa.int64())).to_pylist(),
        txn_ids=texts["txn_id"].take(pa.array(bad, pa.int64())).to_pylist(),
        payloads=redacted_payloads(raw, bad, mapping, tokens), recorded_at_us=recorded_at_us,
    )
    return events, dead


def make_dead_letters(*, run_id: str, stage: str, reasons: list[str], details: list[str], source: str | list[str],
                      source_rows: list[int], txn_ids: list[str | None], payloads: list[str],
                      recorded_at_us: int) -> pa.Table:
    n = len(reasons)
    sources = source if isinstance(source, list) else [source] * n
    # every piece of text copied into a dead letter: card-number-like runs masked
    details = [mask_card_numbers(d) for d in details]
    payloads = [mask_card_numbers(x)[:MAX_PAYLOAD_CHARS] for x in payloads]
    txn_ids = [None if t is None else mask_card_numbers(t)[:MAX_ID_CHARS] for t in txn_ids]
    sources = [mask_card_numbers(x) for x in sources]
    day = recorded_at_us // 86_400_000_000
    return pa.Table.from_arrays(
        [
            pa.array([run_id] * n, pa.string()), pa.array([stage] * n, pa.string()),
            pa.array(reasons, pa.string()), pa.array(details, pa.string()), pa.array(sources, pa.string()),
            pa.array(source_rows, pa.int64()), pa.array(txn_ids, pa.string()), pa.array(payloads, pa.string()),
            pa.array([recorded_at_us] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            pa.array([day] * n, pa.int32()).cast(pa.date32()),
        ],
        schema=DEAD_LETTER_SCHEMA,
    )
