"""The canonical transaction event.

Every source is mapped onto this one shape before any feature is computed (see
``finfeat.jobs.mapping``). Money is integer minor units plus an ISO-4217 currency; time is
UTC event time with microsecond precision; the card number never appears: only its keyed
HMAC token.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import pyarrow as pa

Channel = Literal["pos", "online", "atm", "other", "unknown"]
CHANNELS: tuple[str, ...] = ("pos", "online", "atm", "other", "unknown")

EVENT_TIME_TYPE = pa.timestamp("us", tz="UTC")
#: The ``schema`` field of a transaction message on Kafka (JSON, one canonical event each).
MESSAGE_SCHEMA = "finfeat.txn.v1"

#: Arrow schema of a canonical event, in the order the columns are kept.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("txn_id", pa.string(), nullable=False),
        pa.field("card_token", pa.string(), nullable=False),
        pa.field("merchant_id", pa.string(), nullable=False),
        pa.field("merchant_category", pa.string()),
        pa.field("amount_minor", pa.int64(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("event_time", EVENT_TIME_TYPE, nullable=False),
        pa.field("channel", pa.string(), nullable=False),
        pa.field("card_lat", pa.float64()),
        pa.field("card_lon", pa.float64()),
        pa.field("merchant_lat", pa.float64()),
        pa.field("merchant_lon", pa.float64()),
        pa.field("is_fraud", pa.bool_()),
    ]
)


class TransactionEvent(NamedTuple):
    """One canonical event as a typed row (the streaming and online paths use this)."""

    txn_id: str
    card_token: str
    merchant_id: str
    merchant_category: str | None
    amount_minor: int
    currency: str
    event_time_us: int  # microseconds since the Unix epoch, UTC
    channel: str
    card_lat: float | None = None
    card_lon: float | None = None
    merchant_lat: float | None = None
    merchant_lon: float | None = None
    is_fraud: bool | None = None


def events_to_table(events: list[TransactionEvent]) -> pa.Table:
    """Typed rows to an Arrow table of :data:`EVENT_SCHEMA`."""
    cols = {name: [getattr(e, name if name != "event_time" else "event_time_us") for e in events]
            for name in EVENT_SCHEMA.names}
    arrays = []
    for field in EVENT_SCHEMA:
        if field.name == "event_time":
            arrays.append(pa.array(cols["event_time"], pa.int64()).cast(EVENT_TIME_TYPE))
        else:
            arrays.append(pa.array(cols[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def table_to_events(table: pa.Table) -> list[TransactionEvent]:
    """An Arrow table of :data:`EVENT_SCHEMA` back to typed rows."""
    table = table.select(EVENT_SCHEMA.names)
    times = table.column("event_time").cast(pa.int64()).to_pylist()
    cols = [table.column(n).to_pylist() if n != "event_time" else times for n in EVENT_SCHEMA.names]
    return [TransactionEvent(*row) for row in zip(*cols)]
