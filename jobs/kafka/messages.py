"""The Kafka message of a transaction: JSON, versioned, one canonical event per message.

    {"schema": "finfeat.txn.v1", "txn_id": "t1", "card_token": "tok_...", "merchant_id": "m1",
     "merchant_category": "grocery", "amount_minor": 1250, "currency": "USD",
     "event_time": "2024-01-01T10:00:00.000000Z", "channel": "pos", "card_lat": 40.7,
     "card_lon": -74.0, "merchant_lat": 40.7, "merchant_lon": -74.0, "is_fraud": null}

The message key is the card token (so one card's events stay in order within a partition).
Card numbers never travel: producers tokenize first. Consumers parse messages with the
built-in ``canonical`` mapping, through the same parser as the batch job.
"""
from __future__ import annotations

import json
from datetime import timezone

import pyarrow as pa

from finfeat.schemas.events import EVENT_SCHEMA, MESSAGE_SCHEMA

SCHEMA = MESSAGE_SCHEMA


def encode_events(events: pa.Table) -> list[tuple[bytes, bytes]]:
    """Canonical events -> ``(key, value)`` message pairs."""
    out = []
    for row in events.select(EVENT_SCHEMA.names).to_pylist():
        t = row["event_time"].astimezone(timezone.utc)
        row["event_time"] = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.append((row["card_token"].encode(), json.dumps({"schema": SCHEMA, **row}, separators=(",", ":")).encode()))
    return out
