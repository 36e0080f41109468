"""The feature row: the event's identity and label, then one column per feature of the spec."""
from __future__ import annotations

import pyarrow as pa

from finfeat.schemas.events import EVENT_TIME_TYPE
from finfeat.transforms.spec import FeatureSpec

#: Columns every feature row starts with (the label rides along for training sets).
IDENTITY_FIELDS: list[pa.Field] = [
    pa.field("txn_id", pa.string(), nullable=False),
    pa.field("card_token", pa.string(), nullable=False),
    pa.field("merchant_id", pa.string(), nullable=False),
    pa.field("event_time", EVENT_TIME_TYPE, nullable=False),
    pa.field("event_date", pa.date32(), nullable=False),
    pa.field("amount_minor", pa.int64(), nullable=False),
    pa.field("currency", pa.string(), nullable=False),
    pa.field("channel", pa.string(), nullable=False),
    pa.field("merchant_category", pa.string()),
    pa.field("is_fraud", pa.bool_()),
]
IDENTITY_COLUMNS = [f.name for f in IDENTITY_FIELDS]
PARTITION_COLUMN = "event_date"


def feature_schema(spec: FeatureSpec) -> pa.Schema:
    return pa.schema([*IDENTITY_FIELDS, *spec.arrow_fields()],
                     metadata={"finfeat.spec_hash": spec.spec_hash})
