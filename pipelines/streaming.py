"""The unbounded path of ComputeFeatures: bucketed entity state, event-time timers, one engine.

Each entity kind (card, merchant) is cut into buckets by a stable hash of the entity key
(one by default). A bucket keeps, in Beam state, the events its entities' longest window can still reach
(plus, however old, each entity's newest and newest located event: the unwindowed features
reach back to them) and the events waiting for the watermark. When the watermark passes
the end of an emit tick, no on-time event can still come before it, so the features of the
tick's events are final: the DoFn hands them to the bucket's history
(:class:`~finfeat.transforms.stream_steps.EntityHistory`), which feeds the batch path's engine
the ready events' entities' rows and has it evaluate the windows at the ready events only, all
entities of the bucket at once, and emits the ready rows as one table. Events that arrive behind what was already
emitted are ``late`` and go to their own output (the next backfill repairs their days).

Timers are set on whole milliseconds: the portable Fn API (Prism, Flink, Dataflow) carries
element and timer timestamps in milliseconds, so a timer set at ``t + 1 µs`` comes back as
``t``'s millisecond, below ``t``: such a timer never makes ``t`` final and re-arms itself
forever. A flush at the tick boundary ``b`` (a multiple of ``emit_every_ms``) makes every
event before ``b`` final, which is exact on every runner.

Every stage keeps whole Arrow tables per bucket, so the per-event cost is a few vectorized
calls, not a Python call, a state read and a timer per event and per entity. A bucket sets
one timer per tick its waiting events need (dynamic timer tags), so when the watermark jumps
ahead (a backlog, a replay) every passed tick fires in the same round instead of one tick
per round.

The per-entity parts of a transaction meet in a join keyed by a bucket of the txn id. Each
entity stage sends, for every event it received, exactly one part: its features, or a late
marker; the join emits a row once every entity has answered, and reports the event ``late``
(once) if any entity found it late. Nothing there depends on lateness, so no part is ever
silently dropped.

The steps themselves (late split, timers, flush, history, join) are plain functions in
:mod:`finfeat.transforms.stream_steps`, shared with the Flink job; the DoFns here only move
state in and out of Beam.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, Tuple

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
from apache_beam.utils.timestamp import Timestamp

from finfeat.pipelines.stop import STOP
from finfeat.schemas.features import feature_schema
from finfeat.transforms.buckets import split_by_bucket
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec
from finfeat.transforms.stream_steps import (  # noqa: F401  (re-exported for the jobs)
    FEATURES,
    LATE,
    EntityHistory,
    EntityStep,
    Part,
    StateChange,
    WorkerCopies,
    as_events,
    concat,
    cutoff_of_timer_us,
    event_times_us,
    flush_bucket,
    flush_time_us,
    flush_times_us,
    identity_columns,
    join_parts,
    late_part,
    split_late,
)

#: State keys per entity kind (and for the txn-id join). Every key costs the runner scheduling
#: work per batch; on a local runner one key per kind is fastest (measured on Prism, 2 cores:
#: 4 keys fell behind at 1,000 events/s, 1 key kept up at 5,000/s). Raise it on a cluster.
DEFAULT_BUCKETS = 1
DEFAULT_EMIT_EVERY_MS = 1000


def apply_change(bag: Any, change: StateChange | None) -> None:
    """Apply a step's :class:`StateChange` to a Beam bag state."""
    if change is None:
        return
    if change.reset:
        bag.clear()
    for piece in change.add:
        bag.add(piece)


def refuse_runner_splits() -> None:
    """Make this worker decline runner-initiated splits of bundles of stateful steps.

    Prism (up to at least Beam 2.77) splits any bundle that shows no progress for ~100 ms,
    and mishandles the split of a stateful bundle that also carries timers: it logs
    "Unexpected split on a bundle with timers" (apache/beam#35771) and then loses or
    duplicates some of the bundle's elements and timers, silently. A loaded machine (or a
    slow flush) makes such splits routine. Declining a split is always allowed by the Fn
    API (the bundle just runs to its end), so the worker answers every split request for a
    bundle with a stateful ParDo with an empty split. Other bundles split as before; the
    Kafka source's own checkpoints are not runner-initiated splits and are unaffected.
    Idempotent; called from the stateful DoFns' ``setup`` so that it runs in every worker.
    """
    from apache_beam.runners.worker import bundle_processor

    cls = bundle_processor.BundleProcessor
    if getattr(cls.try_split, "_finfeat_refuses_stateful", False):
        return
    original = cls.try_split

    def try_split(self, bundle_split_request):  # noqa: ANN001, ANN202
        from apache_beam.portability.api import beam_fn_api_pb2

        if _is_stateful(self):
            return beam_fn_api_pb2.ProcessBundleSplitResponse()
        return original(self, bundle_split_request)

    try_split._finfeat_refuses_stateful = True
    cls.try_split = try_split


def _is_stateful(processor: object) -> bool:
    cached = getattr(processor, "_finfeat_stateful", None)
    if cached is None:
        from apache_beam.portability import common_urns
        from apache_beam.portability.api import beam_runner_api_pb2

        cached = False
        for transform in processor.process_bundle_descriptor.transforms.values():
            if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
                payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
                if payload.state_specs or payload.timer_family_specs:
                    cached = True
                    break
        processor._finfeat_stateful = cached
    return cached


_HISTORY_CACHE = WorkerCopies()  # entity histories and seen txn ids, by (kind, key)


def _shape(value: tuple | None) -> tuple[int, int | None, str | None]:
    if value is None:
        return 0, None, None
    if len(value) == 2:  # written before history tokens existed
        return value[0], value[1], None
    return value


class EntityFeaturesFn(beam.DoFn):
    """Exact features of one entity kind, per bucket of entities, once the watermark passes a tick.

    Input ``(bucket, events)``; output ``(txn bucket, (entity, FEATURES | LATE, table))``. The
    work is :mod:`finfeat.transforms.stream_steps`'s; this only moves state in and out of Beam.

    Timers: one per tick boundary that waiting events need (dynamic timer tags, see
    :func:`flush_times_us`), so that when the watermark moves by many ticks at once, every
    timer it passed fires in the same round; a flush at ``b`` releases every waiting event
    before ``b``, so which timers fire, and in which bundles, changes only how the work is cut.
    """

    PENDING = BagStateSpec("pending", PickleCoder())
    HISTORY = BagStateSpec("history", PickleCoder())
    SHAPE = ReadModifyWriteStateSpec("shape", PickleCoder())        # (pieces in HISTORY, kept tails, token)
    HORIZON = ReadModifyWriteStateSpec("horizon", VarIntCoder())   # every event <= this is emitted
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def __init__(self, *, spec: FeatureSpec, entity: str, anchor: bool, join_buckets: int,
                 emit_every_ms: int = DEFAULT_EMIT_EVERY_MS) -> None:
        if emit_every_ms < 1:
            raise ValueError("emit_every_ms must be at least 1")
        self._step = EntityStep(spec=spec, entity=entity, anchor=anchor)
        self._entity, self._join_buckets = entity, join_buckets
        self._tick = emit_every_ms * 1000

    def setup(self) -> None:
        refuse_runner_splits()

    def _to_join(self, kind: str, table: pa.Table) -> Iterator[tuple[int, Part]]:
        for bucket, piece in split_by_bucket(table, "txn_id", self._join_buckets):
            yield bucket, (self._entity, kind, piece)

    def process(self, kv: tuple[int, pa.Table], pending=beam.DoFn.StateParam(PENDING),
                horizon=beam.DoFn.StateParam(HORIZON), flush=beam.DoFn.TimerParam(FLUSH)
                ) -> Iterator[tuple[int, Part]]:
        on_time, late = split_late(kv[1], horizon.read())
        if late is not None:
            yield from self._to_join(LATE, late)
        if on_time is None:
            return
        pending.add(on_time)
        for due in flush_times_us(event_times_us(on_time), self._tick):
            flush.set(Timestamp(micros=due), dynamic_timer_tag=str(due))

    @on_timer(FLUSH)
    def on_flush(self, fired=beam.DoFn.TimestampParam, key=beam.DoFn.KeyParam,
                 pending=beam.DoFn.StateParam(PENDING), history=beam.DoFn.StateParam(HISTORY),
                 shape=beam.DoFn.StateParam(SHAPE), horizon=beam.DoFn.StateParam(HORIZON)
                 ) -> Iterator[tuple[int, Part]]:
        cutoff = cutoff_of_timer_us(fired.micros)
        stop = STOP.cutoff_us()
        if stop is not None:  # a stop drains the pipeline: release only what was final when it came
            cutoff = min(cutoff, stop)
        waiting = concat(pending.read())
        if waiting is None:
            return
        if not (event_times_us(waiting) <= cutoff).any():  # released by an earlier timer of this round
            return
        pieces, kept_tails, token = _shape(shape.read())
        held = _HISTORY_CACHE.take((self._entity, key), token) if pieces else None
        if pieces and held is None:
            held = EntityHistory.from_pieces(history.read(), self._entity)
            if held is not None:
                held.kept_tails = kept_tails or 0
        done = flush_bucket(waiting, held, cutoff, step=self._step)
        yield from self._to_join(FEATURES, done.part)
        apply_change(history, done.change)
        token = uuid.uuid4().hex
        shape.write((done.history.pieces, done.history.kept_tails, token))
        _HISTORY_CACHE.put((self._entity, key), token, done.history)
        before = horizon.read()
        horizon.write(cutoff if before is None else max(before, cutoff))
        pending.clear()
        if done.later is not None:  # their timers were set when they arrived
            pending.add(done.later)


class JoinPartsFn(beam.DoFn):
    """Waits until every entity answered for a txn; emits feature rows, reports late events once.

    Input ``(txn bucket, (entity, FEATURES | LATE, table))``; output feature-row tables and,
    tagged ``late``, one row dict per late event (the work is :func:`join_parts`).
    """

    PARTS = BagStateSpec("parts", PickleCoder())

    def __init__(self, *, spec: FeatureSpec) -> None:
        self._spec = spec
        self._entities = list(spec.entities)

    def setup(self) -> None:
        refuse_runner_splits()
        self._schema = feature_schema(self._spec)

    def process(self, kv: tuple[int, Part], parts=beam.DoFn.StateParam(PARTS)) -> Iterator[object]:
        _, new = kv
        joined = join_parts([*parts.read(), new], self._entities, self._schema)
        if joined.rows is None and not joined.late:  # nothing complete: keep the new part with the others
            parts.add(new)
            return
        if joined.rows is not None:
            yield joined.rows
        for row in joined.late:
            yield pvalue.TaggedOutput(LATE, row)
        parts.clear()
        for part in joined.keep:
            parts.add(part)


class ComputeFeaturesUnbounded(beam.PTransform):
    """The unbounded counterpart of ComputeFeatures; outputs ``{"features", "late"}``.

    Input: tables of canonical events (any number of rows each). ``features``: feature-row
    tables; ``late``: one dict per late event (its columns and ``event_time_us``).
    ``emit_every_ms``: an event's features are emitted once the watermark passes the next
    multiple of this after it (1 = as soon as the watermark passes the event's millisecond;
    larger values batch more work per timer).
    """

    def __init__(self, *, spec: FeatureSpec, buckets: int = DEFAULT_BUCKETS,
                 emit_every_ms: int = DEFAULT_EMIT_EVERY_MS) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self._spec, self._buckets, self._every = spec, buckets, emit_every_ms

    def expand(self, events: beam.PCollection) -> dict[str, beam.PCollection]:
        spec, buckets = self._spec, self._buckets
        entities = list(spec.entities)
        rows = events | "CanonicalColumns" >> beam.Map(as_events).with_output_types(pa.Table)
        if not entities:
            def calendar_only(table: pa.Table) -> pa.Table:
                schema = feature_schema(spec)
                return pa.table(identity_columns(table, spec)).select(schema.names).cast(schema)

            features = rows | "IdentityAndCalendar" >> beam.Map(calendar_only)
            late = events.pipeline | "NothingLate" >> beam.Create([])
            return {"features": features, "late": late}
        parts = []
        for i, entity in enumerate(entities):
            label = entity.capitalize()
            parts.append(
                rows
                | f"BucketBy{label}" >> beam.FlatMap(split_by_bucket, ENTITY_COLUMNS[entity], buckets
                                                    ).with_output_types(Tuple[int, pa.Table])
                | f"Accumulate{label}InEventTime" >> beam.ParDo(EntityFeaturesFn(
                    spec=spec, entity=entity, anchor=i == 0, join_buckets=buckets, emit_every_ms=self._every)
                ).with_output_types(Tuple[int, Any]))
        joined = (parts
                  | "FlattenParts" >> beam.Flatten()
                  | "JoinOnTxnId" >> beam.ParDo(JoinPartsFn(spec=spec)).with_outputs(LATE, main="features"))
        return {"features": joined.features, "late": joined[LATE]}
