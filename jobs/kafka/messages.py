"""Kafka messages: JSON, versioned by a ``schema`` field, one record per message.

A transaction (``finfeat.txn.v1``), keyed by card token (one card's events stay in order
within a partition)::

    {"schema": "finfeat.txn.v1", "txn_id": "t1", "card_token": "tok_...", "merchant_id": "m1",
     "merchant_category": "grocery", "amount_minor": 1250, "currency": "USD",
     "event_time": "2024-01-01T10:00:00.000000Z", "channel": "pos", "card_lat": 40.7,
     "card_lon": -74.0, "merchant_lat": 40.7, "merchant_lon": -74.0, "is_fraud": null}

Card numbers never travel: producers tokenize first. Consumers parse transactions with the
built-in ``canonical`` mapping, through the same parser as the batch job.

A label (``finfeat.label.v1``: a chargeback, a confirmed fraud), keyed by txn id::

    {"schema": "finfeat.label.v1", "txn_id": "t1", "is_fraud": true,
     "label_time": "2024-01-03T08:00:00.000000Z", "source": "chargebacks.csv"}

``label_time`` is when the label became known (ISO 8601, UTC); ``source`` names the feed (a
labels file's name, as the backfill records it; optional, the topic's name when absent): per
transaction the latest label time wins, then the larger source. Consumers read the three label
fields exactly as a JSON Lines labels file is read (:func:`decode_labels`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timezone

import pyarrow as pa

from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.events import EVENT_SCHEMA, MAX_ID_CHARS, MESSAGE_SCHEMA
from finfeat.schemas.labels import LABEL_MESSAGE_SCHEMA, LABEL_SCHEMA
from finfeat.schemas.redaction import looks_like_card_number, mask_card_numbers, opaque_payload, shown

SCHEMA = MESSAGE_SCHEMA
LABEL_SCHEMA_NAME = LABEL_MESSAGE_SCHEMA


def _iso_utc(us: int) -> str:
    """UTC microseconds -> ``2024-01-01T10:00:00.000000Z``."""
    from datetime import datetime, timedelta

    t = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_events(events: pa.Table) -> list[tuple[bytes, bytes]]:
    """Canonical events -> ``(key, value)`` message pairs."""
    out = []
    for row in events.select(EVENT_SCHEMA.names).to_pylist():
        t = row["event_time"].astimezone(timezone.utc)
        row["event_time"] = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.append((row["card_token"].encode(), json.dumps({"schema": SCHEMA, **row}, separators=(",", ":")).encode()))
    return out


def encode_labels(labels: pa.Table) -> list[tuple[bytes, bytes]]:
    """Parsed labels (:data:`~finfeat.schemas.labels.LABEL_SCHEMA`, e.g. from
    :func:`~finfeat.transforms.labels.parse_labels`) -> ``(txn id, value)`` message pairs."""
    times = labels.column("label_time").cast(pa.int64()).to_pylist()
    out = []
    for txn_id, fraud, t, source in zip(labels.column("txn_id").to_pylist(), labels.column("is_fraud").to_pylist(),
                                        times, labels.column("source").to_pylist()):
        body = {"schema": LABEL_SCHEMA_NAME, "txn_id": txn_id, "is_fraud": bool(fraud), "label_time": _iso_utc(t),
                "source": source}
        out.append((txn_id.encode(), json.dumps(body, separators=(",", ":")).encode()))
    return out


def _source_problem(value: object) -> tuple[str, str] | None:
    """Why a message's ``source`` cannot name a labels feed (reason, detail), or None."""
    if not isinstance(value, str) or not value.strip():
        return "wrong_type", f"source must be a non-empty text, not {shown(value)}"
    if len(value) > MAX_ID_CHARS:
        return "field_too_long", f"source is longer than {MAX_ID_CHARS} characters"
    if looks_like_card_number(value):
        return "card_number_in_field", "source holds a card-number-like value (value not shown)"
    if "\0" in value:
        return "wrong_type", "source holds a NUL character"
    return None


def decode_labels(messages: Sequence[tuple[int, bytes | None]], *, source: str, default_source: str, run_id: str,
                  recorded_at_us: int) -> tuple[pa.Table, pa.Table]:
    """One partition's label messages ``(offset, value)`` -> ``(labels, dead letters)``.

    A message that is not a JSON object of schema ``finfeat.label.v1`` is an ``unparseable``
    dead letter (no value of it kept); its label fields go through
    :func:`~finfeat.transforms.labels.parse_labels`, as a labels file's rows do. Dead letters
    name ``source`` (``topic/partition``) and the offset as their row; a label keeps its
    message's ``source`` (``default_source`` when absent)."""
    from finfeat.jobs.sources import label_records_table
    from finfeat.transforms.labels import parse_labels
    from finfeat.transforms.parse import make_dead_letters

    bad: list[tuple[int, str, str, str, str | None]] = []   # offset, reason, detail, payload, txn id
    groups: dict[str, tuple[list[dict[str, object]], list[int]]] = {}
    for offset, value in messages:
        try:
            rec = json.loads(value or b"", parse_float=str, parse_int=str)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            if rec.get("schema") != LABEL_SCHEMA_NAME:
                raise ValueError(f"schema {shown(rec.get('schema'))} is not {LABEL_SCHEMA_NAME}")
        except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as exc:
            bad.append((offset, "unparseable", f"offset {offset}: {exc}", opaque_payload(chars=len(value or b"")), None))
            continue
        feed = rec.get("source", default_source)
        problem = _source_problem(feed)
        if problem is not None:
            txn = rec.get("txn_id")
            payload = json.dumps({k: rec.get(k) for k in ("txn_id", "is_fraud", "label_time")}, default=str,
                                 sort_keys=True)
            bad.append((offset, problem[0], f"offset {offset}: {problem[1]}", payload,
                        txn if isinstance(txn, str) else None))
            continue
        records, offsets = groups.setdefault(str(feed), ([], []))
        records.append(rec)
        offsets.append(offset)
    parts, dead_parts = [LABEL_SCHEMA.empty_table()], []
    for feed, (records, offsets) in sorted(groups.items()):
        labels, dead = parse_labels(label_records_table(records, offsets), source=feed, run_id=run_id,
                                    recorded_at_us=recorded_at_us)
        parts.append(labels)
        if dead.num_rows:  # dead letters name where the message is: the topic's partition and the offset
            at = dead.schema.get_field_index("source")
            dead_parts.append(dead.set_column(at, dead.schema.field(at), pa.array([mask_card_numbers(source)]
                                                                                  * dead.num_rows, pa.string())))
    if bad:
        dead_parts.append(make_dead_letters(
            run_id=run_id, stage="labels", reasons=[b[1] for b in bad], details=[b[2] for b in bad], source=source,
            source_rows=[b[0] for b in bad], txn_ids=[b[4] for b in bad], payloads=[b[3] for b in bad],
            recorded_at_us=recorded_at_us))
    dead = pa.concat_tables(dead_parts) if dead_parts else DEAD_LETTER_SCHEMA.empty_table()
    if dead.num_rows:
        dead = dead.sort_by("source_row")
    labels = pa.concat_tables(parts)
    return labels, dead

