"""Dead letters: records that could not become a valid event, kept with a reason."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa

Stage = Literal["read", "parse", "dedup", "late", "labels"]

#: Reason codes, stable: dashboards and tests key on them.
REASONS: tuple[str, ...] = (
    "unparseable",          # the line/record could not be read at all (bad CSV row, bad JSON, invalid UTF-8)
    "unreadable_file",      # a whole file (or its rest) could not be read; detail says why and what to do
    "missing_field",        # a required field is absent or empty
    "wrong_type",           # a field has a value of the wrong type (e.g. a word where a number goes)
    "bad_timestamp",        # the event time cannot be parsed in the mapped format and zone
    "negative_amount",      # amount below zero
    "non_finite_amount",    # NaN or infinite amount
    "amount_precision",     # more decimals than the currency's minor unit allows
    "amount_out_of_range",  # above MAX_AMOUNT_MINOR (10**12 minor units)
    "card_number_in_field",  # a card-number-like value in an id column (txn id, merchant, category, token)
    "field_too_long",       # an id column longer than MAX_ID_CHARS
    "unknown_currency",     # not an ISO-4217 code
    "bad_coordinates",      # latitude/longitude out of range
    "duplicate_txn_id",     # a repeated txn id; one copy is kept by a deterministic rule
    "late",                 # streaming: later than the allowed lateness
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),      # file name
        pa.field("source_row", pa.int64(), nullable=False),   # 0-based record number in the file (unreadable_file:
    #                                                       the first record that could not be read)
        pa.field("txn_id", pa.string()),                     # when it could be read
        pa.field("raw_payload", pa.string(), nullable=False),  # the record, PII redacted
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("recorded_date", pa.date32(), nullable=False),
    ]
)


def empty_dead_letters() -> pa.Table:
    return DEAD_LETTER_SCHEMA.empty_table()
