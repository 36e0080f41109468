"""The unbounded path of ComputeFeatures: per-entity state, event-time timers, one engine.

Each entity (card, merchant) keeps, in Beam state, the events its longest window can still
reach plus the events waiting for the watermark. When the watermark passes an event's time,
no on-time event can still come before it, so its features are final: the DoFn calls the
very function the batch path calls (:func:`compute_entity_features`) on history + ready
events and emits the ready rows. Events that arrive behind what was already emitted are
``late`` and go to their own output (the next backfill repairs their days).
"""
from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
from apache_beam import pvalue
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.schemas.features import IDENTITY_COLUMNS, feature_schema
from finfeat.transforms.features import compute_calendar_features, compute_entity_features
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec

LATE = "late"
_US_PER_DAY = 86_400_000_000


def explode_with_event_time(table: pa.Table) -> Iterator[TimestampedValue]:
    """One element per event, stamped with its event time (the watermark's clock)."""
    for row in table.select(EVENT_SCHEMA.names).to_pylist():
        t = row["event_time"]
        row["event_time_us"] = int(t.timestamp()) * 1_000_000 + t.microsecond
        yield TimestampedValue(row, Timestamp(micros=row["event_time_us"]))


def _rows_to_events(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in EVENT_SCHEMA.names} for r in rows], schema=EVENT_SCHEMA)


def _trim(rows: list[dict], oldest_us: int) -> list[dict]:
    """History the windows can still reach (after ``oldest_us``), plus the newest event and the
    newest located event before that: features without a window reach back to those."""
    kept = [r for r in rows if r["event_time_us"] > oldest_us]
    older = [r for r in rows if r["event_time_us"] <= oldest_us]
    if older:
        order = lambda r: (r["event_time_us"], r["txn_id"])  # noqa: E731
        tail = {max(older, key=order)["txn_id"]: max(older, key=order)}
        located = [r for r in older if r["merchant_lat"] is not None and r["merchant_lon"] is not None]
        if located:
            newest = max(located, key=order)
            tail[newest["txn_id"]] = newest
        kept = list(tail.values()) + kept
    return kept


class EntityFeaturesFn(beam.DoFn):
    """Exact features of one entity kind, emitted once the watermark has passed each event."""

    PENDING = BagStateSpec("pending", PickleCoder())
    HISTORY = BagStateSpec("history", PickleCoder())
    HORIZON = ReadModifyWriteStateSpec("horizon", VarIntCoder())   # every event <= this is emitted
    NEXT = ReadModifyWriteStateSpec("next", VarIntCoder())         # the timer currently set
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def __init__(self, *, spec: FeatureSpec, entity: str) -> None:
        self._defs, self._entity, self._reach = spec.for_entity(entity), entity, spec.max_window_us

    def process(self, kv: tuple[str, dict], pending=beam.DoFn.StateParam(PENDING),
                horizon=beam.DoFn.StateParam(HORIZON), nxt=beam.DoFn.StateParam(NEXT),
                flush=beam.DoFn.TimerParam(FLUSH)) -> Iterator[object]:
        _, row = kv
        t = row["event_time_us"]
        done = horizon.read()
        if done is not None and t <= done:
            yield pvalue.TaggedOutput(LATE, row)
            return
        pending.add(row)
        current = nxt.read()
        if current is None or t + 1 < current:
            nxt.write(t + 1)
            flush.set(Timestamp(micros=t + 1))

    @on_timer(FLUSH)
    def on_flush(self, fired=beam.DoFn.TimestampParam, pending=beam.DoFn.StateParam(PENDING),
                 history=beam.DoFn.StateParam(HISTORY), horizon=beam.DoFn.StateParam(HORIZON),
                 nxt=beam.DoFn.StateParam(NEXT), flush=beam.DoFn.TimerParam(FLUSH)) -> Iterator[object]:
        cutoff = fired.micros - 1  # the watermark has passed every event at or before this
        waiting = list(pending.read())
        ready = [r for r in waiting if r["event_time_us"] <= cutoff]
        later = [r for r in waiting if r["event_time_us"] > cutoff]
        kept = _trim(list(history.read()), cutoff - self._reach)
        if ready:
            table = _rows_to_events(kept + ready)
            cols = compute_entity_features(table, self._defs, self._entity)
            first = len(kept)
            for i, r in enumerate(ready):
                yield r["txn_id"], (self._entity, {name: arr[first + i].as_py() for name, arr in cols.items()})
        history.clear()
        for r in kept + ready:
            history.add(r)
        pending.clear()
        for r in later:
            pending.add(r)
        horizon.write(cutoff)
        if later:
            t = min(r["event_time_us"] for r in later) + 1
            nxt.write(t)
            flush.set(Timestamp(micros=t))
        else:
            nxt.clear()


class JoinFeatureRowFn(beam.DoFn):
    """Waits for the identity part and every entity's part of a txn, then emits the row."""

    PARTS = BagStateSpec("parts", PickleCoder())

    def __init__(self, *, spec: FeatureSpec) -> None:
        self._spec = spec
        self._needed = 1 + len(spec.entities)

    def setup(self) -> None:
        self._schema = feature_schema(self._spec)

    def process(self, kv: tuple[str, tuple[str, dict]], parts=beam.DoFn.StateParam(PARTS)) -> Iterator[pa.Table]:
        _, part = kv
        got = [*parts.read(), part]
        if len(got) < self._needed:
            parts.add(part)
            return
        parts.clear()
        row: dict[str, object] = {}
        for _, values in got:
            row.update(values)
        yield pa.Table.from_pylist([row], schema=self._schema)


class FirstPerKeyFn(beam.DoFn):
    """Passes the first element of each key, drops the rest (an event late for two entities)."""

    SEEN = ReadModifyWriteStateSpec("seen", VarIntCoder())

    def process(self, kv: tuple[str, object], seen=beam.DoFn.StateParam(SEEN)) -> Iterator[object]:
        if seen.read() is None:
            seen.write(1)
            yield kv[1]


class ComputeFeaturesUnbounded(beam.PTransform):
    """The unbounded counterpart of ComputeFeatures; outputs ``{"features", "late"}``."""

    def __init__(self, *, spec: FeatureSpec) -> None:
        super().__init__()
        self._spec = spec

    def expand(self, events: beam.PCollection) -> dict[str, beam.PCollection]:
        spec = self._spec
        rows = events | "StampEventTime" >> beam.FlatMap(explode_with_event_time)

        def identity(row: dict) -> tuple[str, tuple[str, dict]]:
            table = _rows_to_events([row])
            values = {name: row[name] for name in IDENTITY_COLUMNS if name != "event_date"}
            values["event_date"] = pa.scalar(row["event_time_us"] // _US_PER_DAY, pa.int32()).cast(pa.date32()).as_py()
            for name, arr in compute_calendar_features(table, spec.for_entity("event")).items():
                values[name] = arr[0].as_py()
            return row["txn_id"], ("base", values)

        parts = [rows | "IdentityAndCalendar" >> beam.Map(identity)]
        lates = []
        for entity in spec.entities:
            label = entity.capitalize()
            out = (rows
                   | f"KeyBy{label}" >> beam.Map(lambda r, c=ENTITY_COLUMNS[entity]: (r[c], r))
                   | f"Accumulate{label}InEventTime" >> beam.ParDo(
                       EntityFeaturesFn(spec=spec, entity=entity)).with_outputs(LATE, main="features"))
            parts.append(out.features)
            lates.append(out[LATE])
        features = (parts
                    | "FlattenParts" >> beam.Flatten()
                    | "JoinOnTxnId" >> beam.ParDo(JoinFeatureRowFn(spec=spec)))
        late = (lates | "FlattenLate" >> beam.Flatten()
                | "KeyLateByTxnId" >> beam.Map(lambda r: (r["txn_id"], r))
                | "ReportLateOnce" >> beam.ParDo(FirstPerKeyFn()))
        return {"features": features, "late": late}
