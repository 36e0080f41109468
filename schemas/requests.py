"""A scoring or lookup request: one candidate transaction, validated as strictly as an event.

``finfeat score --json/--jsonl`` and ``finfeat serve-lookup`` both build a
:class:`TransactionRequest`, so a request the batch parser would dead-letter (a negative,
fractional, boolean or out-of-range amount, a time outside 1970-2100, a non-finite or
out-of-range coordinate, a card number where a token goes) is refused with a message, never
scored. The bounds are the parser's (:mod:`finfeat.schemas.events`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from finfeat.schemas.currencies import ISO_4217
from finfeat.schemas.events import (
    MAX_ABS_LAT,
    MAX_ABS_LON,
    MAX_AMOUNT_MINOR,
    MAX_EVENT_US,
    MAX_ID_CHARS,
    MIN_EVENT_US,
)
from finfeat.schemas.redaction import looks_like_card_number

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class RequestError(ValueError):
    """A request is malformed or out of bounds; the message names the field."""


def iso_to_us(text: str) -> int:
    """ISO-8601 time -> UTC microseconds (no offset = UTC); ValueError when it is not one."""
    try:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        delta = dt - _EPOCH
    except (ValueError, OverflowError, TypeError):
        raise ValueError(f"{text!r} is not an ISO-8601 time, e.g. 2020-06-22T18:30:00Z") from None
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]
Amount = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR,
                                    description="integer minor units, 0 to MAX_AMOUNT_MINOR")]


class TransactionRequest(BaseModel):
    """One candidate transaction (extra keys are ignored; ``lat``/``lon`` alias the merchant's)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    card_token: Id
    merchant_id: Id
    amount_minor: Amount
    at_us: StrictInt = Field(description="UTC microseconds; or give 'at' as ISO-8601")
    currency: StrictStr = ""
    merchant_lat: float | None = None
    merchant_lon: float | None = None
    txn_id: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _time_and_aliases(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError("a request is a JSON object")
        data = dict(data)
        for short, full in (("lat", "merchant_lat"), ("lon", "merchant_lon")):
            if data.get(full) is None and short in data:
                data[full] = data.pop(short)
        if data.get("at_us") is None:
            at = data.get("at")
            if at is None:
                raise ValueError("give 'at' (ISO-8601) or 'at_us' (UTC microseconds)")
            if not isinstance(at, str):
                raise ValueError(f"at: {at!r} is not an ISO-8601 time string")
            data["at_us"] = iso_to_us(at)
        return data

    @field_validator("at_us")
    @classmethod
    def _time_range(cls, v: int) -> int:
        if not MIN_EVENT_US <= v < MAX_EVENT_US:
            raise ValueError("the time must be between 1970-01-01 and 2100-01-01 UTC")
        return v

    @field_validator("merchant_lat", "merchant_lon", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{v!r} is not a number of degrees")
        if not math.isfinite(v):
            raise ValueError(f"{v!r} is not a finite number")
        return float(v)

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if v and v.upper() not in ISO_4217:
            raise ValueError(f"{v!r} is not an ISO-4217 currency code")
        return v.upper()

    @field_validator("card_token", "merchant_id", "txn_id")
    @classmethod
    def _no_card_number(cls, v: str | None) -> str | None:
        if v is not None and looks_like_card_number(v):
            raise ValueError("holds a card-number-like value: send the card's token, never the number")
        return v

    @model_validator(mode="after")
    def _coordinates(self) -> TransactionRequest:
        if (self.merchant_lat is None) != (self.merchant_lon is None):
            raise ValueError("give both merchant_lat and merchant_lon, or neither")
        if self.merchant_lat is not None and abs(self.merchant_lat) > MAX_ABS_LAT:
            raise ValueError(f"merchant_lat {self.merchant_lat} is outside +-{MAX_ABS_LAT:g}")
        if self.merchant_lon is not None and abs(self.merchant_lon) > MAX_ABS_LON:
            raise ValueError(f"merchant_lon {self.merchant_lon} is outside +-{MAX_ABS_LON:g}")
        return self


def parse_request(data: Any) -> TransactionRequest:
    """A validated request, or :class:`RequestError` naming every field that is wrong."""
    try:
        return TransactionRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError("; ".join(
            (f"{'.'.join(str(p) for p in err['loc'])}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
            for err in exc.errors())) from None


_AMOUNT = TypeAdapter(Amount)


def check_amount(value: Any, *, name: str = "amount_minor") -> int:
    """An amount in integer minor units within the parser's bounds, or :class:`RequestError`."""
    try:
        return _AMOUNT.validate_python(value)
    except ValidationError as exc:
        raise RequestError(f"{name}: {exc.errors()[0]['msg']}") from None
