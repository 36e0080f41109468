"""Fraud labels: one row per transaction, with the time the label became known."""
from __future__ import annotations

import pyarrow as pa

from finfeat.schemas.events import EVENT_TIME_TYPE

LABEL_SCHEMA = pa.schema(
    [
        pa.field("txn_id", pa.string(), nullable=False),
        pa.field("is_fraud", pa.bool_(), nullable=False),
        pa.field("label_time", EVENT_TIME_TYPE, nullable=False),
        pa.field("source", pa.string(), nullable=False),   # "events" or the labels file's name
        pa.field("label_date", pa.date32(), nullable=False),
    ]
)
#: Columns a labels file must have (CSV, JSON Lines or Parquet).
LABEL_FILE_COLUMNS = ("txn_id", "is_fraud", "label_time")
#: The ``schema`` value of a label message on Kafka (``finfeat.jobs.kafka.messages``).
LABEL_MESSAGE_SCHEMA = "finfeat.label.v1"
