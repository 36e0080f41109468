"""Labels that arrive late: parse a labels feed, attach labels to events, derive label rows.

A label from a labels feed (chargebacks, confirmed fraud) carries the time it became known.
A label that came with the event itself has no such time: it counts as known ``delay``
after its transaction. When both exist for a transaction, the feed wins; within a feed, the
latest label time wins.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.events import EVENT_TIME_TYPE
from finfeat.schemas.labels import LABEL_FILE_COLUMNS, LABEL_SCHEMA
from finfeat.schemas.mapping import MappingError
from finfeat.schemas.redaction import CARD_IN_ID_RE2
from finfeat.transforms.parse import MAX_ID_CHARS, SOURCE_ROW, _parse_label, _parse_time, _Problems, make_dead_letters

_US_PER_DAY = 86_400_000_000


def parse_labels(raw: pa.Table, *, source: str, run_id: str, recorded_at_us: int) -> tuple[pa.Table, pa.Table]:
    """A labels feed batch (txn_id, is_fraud, label_time) -> ``(labels, dead_letters)``."""
    missing_cols = [c for c in LABEL_FILE_COLUMNS if c not in raw.column_names]
    if missing_cols:
        raise MappingError(f"labels file {source} lacks column(s) {missing_cols}; a labels file has "
                           f"columns {list(LABEL_FILE_COLUMNS)}")
    n = raw.num_rows
    p = _Problems.new(n)
    txn = pc.utf8_trim_whitespace(raw.column("txn_id").combine_chunks().cast(pa.string()))
    p.flag(pc.or_(pc.is_null(txn), pc.equal(txn, "")).fill_null(True), "missing_field", "txn_id is missing")
    p.flag(pc.match_substring_regex(txn, CARD_IN_ID_RE2), "card_number_in_field",
           "txn_id holds a card-number-like value (value not shown)")
    p.flag(pc.greater(pc.utf8_length(txn), MAX_ID_CHARS).fill_null(False), "field_too_long",
           f"txn_id is longer than {MAX_ID_CHARS} characters")
    p.flag(pc.match_substring(txn, "\0").fill_null(False), "wrong_type", "txn_id holds a NUL character")
    label_raw = raw.column("is_fraud").combine_chunks()
    label = _parse_label(label_raw, ["1", "true", "True", "TRUE"], ["0", "false", "False", "FALSE"], p, "is_fraud")
    p.flag(pc.is_null(label), "missing_field", "is_fraud is missing")
    t = _parse_time(raw.column("label_time").combine_chunks(), "iso8601", "UTC", p, "label_time")
    ok = p.ok
    keep = pa.array(ok)
    labels = pa.Table.from_arrays(
        [txn.filter(keep), label.filter(keep), pa.array(t[ok], pa.int64()).cast(EVENT_TIME_TYPE),
         pa.array([source] * int(ok.sum()), pa.string()),
         pa.array(t[ok] // _US_PER_DAY, pa.int32()).cast(pa.date32())],
        schema=LABEL_SCHEMA)
    bad = np.flatnonzero(~ok)
    rows = raw.column(SOURCE_ROW).combine_chunks().take(pa.array(bad, pa.int64())).to_pylist() \
        if SOURCE_ROW in raw.column_names else [int(i) for i in bad]
    import json

    payloads = [json.dumps(r, default=str, sort_keys=True)
                for r in raw.select(list(LABEL_FILE_COLUMNS)).take(pa.array(bad, pa.int64())).to_pylist()]
    dead = make_dead_letters(run_id=run_id, stage="labels", reasons=list(p.reason[bad]), details=list(p.detail[bad]),
                             source=source, source_rows=rows,
                             txn_ids=txn.take(pa.array(bad, pa.int64())).to_pylist(), payloads=payloads,
                             recorded_at_us=recorded_at_us)
    return labels, dead


def latest_per_txn(labels: pa.Table) -> pa.Table:
    """One label per txn id: the one with the latest label time (then the larger source name)."""
    if labels.num_rows == 0:
        return labels
    ordered = labels.sort_by([("txn_id", "ascending"), ("label_time", "descending"), ("source", "descending")])
    codes = pc.dictionary_encode(ordered.column("txn_id").combine_chunks()).indices.to_numpy(zero_copy_only=False)
    first = np.ones(len(codes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    return ordered.filter(pa.array(first))


def attach_labels(events: pa.Table, labels: pa.Table | None) -> pa.Table:
    """Events with ``is_fraud`` overridden by the feed where it has a label, and ``label_time``
    (null where the label came with the event)."""
    if labels is None or labels.num_rows == 0:
        return events.append_column("label_time", pa.nulls(events.num_rows, EVENT_TIME_TYPE))
    feed = latest_per_txn(labels).select(["txn_id", "is_fraud", "label_time"]).rename_columns(
        ["txn_id", "_feed_fraud", "label_time"])
    joined = events.join(feed, keys="txn_id", join_type="left outer")
    fraud = pc.coalesce(joined.column("_feed_fraud"), joined.column("is_fraud"))
    joined = joined.set_column(joined.column_names.index("is_fraud"), "is_fraud", fraud)
    # a join drops the events' not-null flags; keep the schema of a bucket without feed labels, so that
    # buckets with and without them concatenate downstream
    schema = pa.schema([*events.schema, pa.field("label_time", EVENT_TIME_TYPE)])
    return joined.drop_columns(["_feed_fraud"]).select([*events.column_names, "label_time"]).cast(schema)


def label_rows(events: pa.Table, *, delay_us: int, feed_source: str = "labels") -> pa.Table:
    """Label-table rows for labelled events: the feed's time where given, else event time + delay."""
    labelled = events.filter(pc.is_valid(events.column("is_fraud")))
    t = labelled.column("event_time").cast(pa.int64()).to_numpy()
    given = labelled.column("label_time").cast(pa.int64())
    has = given.is_valid().to_numpy(zero_copy_only=False)
    when = np.where(has, given.fill_null(0).to_numpy(zero_copy_only=False), t + delay_us)
    source = np.where(has, feed_source, "events")
    return pa.Table.from_arrays(
        [labelled.column("txn_id").combine_chunks(), labelled.column("is_fraud").combine_chunks(),
         pa.array(when, pa.int64()).cast(EVENT_TIME_TYPE), pa.array(source.tolist(), pa.string()),
         pa.array(when // _US_PER_DAY, pa.int32()).cast(pa.date32())],
        schema=LABEL_SCHEMA)
