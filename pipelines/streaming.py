"""The unbounded path of ComputeFeatures: bucketed entity state, event-time timers, one engine.

Each entity kind (card, merchant) is cut into buckets by a stable hash of the entity key
(one by default). A bucket keeps, in Beam state, the events its entities' longest window can still reach
(plus, however old, each entity's newest and newest located event: the unwindowed features
reach back to them) and the events waiting for the watermark. When the watermark passes
the end of an emit tick, no on-time event can still come before it, so the features of the
tick's events are final: the DoFn calls the very function the batch path calls
(:func:`compute_entity_features`) on history + ready events, all entities of the bucket at
once, and emits the ready rows as one table. Events that arrive behind what was already
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
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.schemas.features import IDENTITY_COLUMNS, feature_schema
from finfeat.transforms.buckets import split_by_bucket
from finfeat.transforms.features import compute_calendar_features, compute_entity_features, history_tail
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec

LATE = "late"
FEATURES = "features"
#: State keys per entity kind (and for the txn-id join). Every key costs the runner scheduling
#: work per batch; on a local runner one key per kind is fastest (measured on Prism, 2 cores:
#: 4 keys fell behind at 1,000 events/s, 1 key kept up at 5,000/s). Raise it on a cluster.
DEFAULT_BUCKETS = 1
DEFAULT_EMIT_EVERY_MS = 1000
_US_PER_DAY = 86_400_000_000
_US_PER_MS = 1000
_MAX_HISTORY_CHUNKS = 64  # history is appended per flush and compacted past this many pieces
_DENSE_TIMERS = 16        # up to this many tick timers per batch of new events, else a ladder

Part = Tuple[str, str, pa.Table]  # (entity, FEATURES | LATE, table)


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


def flush_time_us(t_us: int, tick_us: int = _US_PER_MS) -> int:
    """The first tick boundary after ``t_us``: once the watermark reaches it, ``t_us`` is final."""
    return (t_us // tick_us + 1) * tick_us


def flush_times_us(t_us: np.ndarray, tick_us: int, dense: int = _DENSE_TIMERS) -> list[int]:
    """The timers to set for newly waiting events: every tick boundary they need when there are
    at most ``dense`` of them (each event released as soon as its tick is final); otherwise
    (a replay, a backlog) the first and the last, and between them the first multiple of
    ``tick * 2**k`` after the earliest event for each k: however far the watermark has moved,
    the timers it passed fire in one round and the latest of them releases nearly all."""
    ticks = np.unique((t_us // tick_us + 1) * tick_us)
    if len(ticks) <= dense:
        return [int(x) for x in ticks]
    first, last = int(ticks[0]), int(ticks[-1])
    times = {first, last}
    step = tick_us * 2
    while True:
        boundary = flush_time_us(int(t_us.min()), step)
        if boundary >= last:
            break
        times.add(boundary)
        step *= 2
    return sorted(times)


def event_times_us(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("event_time").cast(pa.int64()).to_numpy(), dtype=np.int64)


def as_events(table: pa.Table) -> pa.Table:
    """The canonical event columns only, in the canonical schema (every piece concatenates)."""
    return table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def late_rows(table: pa.Table) -> list[dict]:
    """Late events as the late output carries them: the event's columns plus ``event_time_us``."""
    rows = table.to_pylist()
    for row, t in zip(rows, event_times_us(table).tolist()):
        row["event_time_us"] = t
    return rows


def _concat(tables: Iterable[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def identity_columns(events: pa.Table, spec: FeatureSpec) -> dict[str, pa.Array]:
    """The identity part of the feature row and the calendar features, for every event."""
    cols: dict[str, Any] = {}
    days = event_times_us(events) // _US_PER_DAY
    for name in IDENTITY_COLUMNS:
        cols[name] = (pa.array(days.astype(np.int32)).cast(pa.date32()) if name == "event_date"
                      else events.column(name))
    cols.update(compute_calendar_features(events, spec.for_entity("event")))
    return cols


def _shape(value: tuple | None) -> tuple[int, int | None, str | None]:
    if value is None:
        return 0, None, None
    if len(value) == 2:  # written before history tokens existed
        return value[0], value[1], None
    return value


class _Held:
    """A bucket's history with its entity keys as integer codes, to pick an entity's rows fast."""

    _COMBINE_AT = 16  # chunks: appends add one each; past this the table is made contiguous

    def __init__(self, table: pa.Table, column: str) -> None:
        self.column = column
        self.table = table.combine_chunks()
        encoded = pc.dictionary_encode(self.table.column(column).combine_chunks())
        self.codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.code_of = {k: i for i, k in enumerate(encoded.dictionary.to_pylist())}

    def rows_of(self, keys: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The history rows of these entity keys."""
        wanted = [self.code_of[k] for k in set(keys.to_pylist()) if k in self.code_of]
        if not wanted:
            return self.table.slice(0, 0)
        return self.table.take(pa.array(np.flatnonzero(np.isin(self.codes, wanted))))

    def append(self, ready: pa.Table) -> _Held:
        code_of = self.code_of
        new = np.fromiter((code_of.setdefault(k, len(code_of)) for k in ready.column(self.column).to_pylist()),
                          dtype=np.int64, count=ready.num_rows)
        self.codes = np.concatenate([self.codes, new])
        table = pa.concat_tables([self.table, ready.select(self.table.column_names)])
        self.table = table.combine_chunks() if table.column(0).num_chunks > self._COMBINE_AT else table
        return self


class _HistoryCache:
    """This worker's copy of each bucket's history, valid while the state's token matches.

    Reading a bucket's whole history back from the runner and scanning its entity keys at every
    flush were the streaming job's largest costs (portable runners such as Prism offer the SDK
    no state cache). Every flush writes a fresh random token beside the history in state and
    keeps the resulting history here under that token; the next flush of the bucket reads the
    (small) token from state and uses this copy only if the tokens match. A flush takes the copy
    out while it works and puts it back with the new token only at its end, so a flush that
    fails leaves no copy behind. Any other writer of the state (another worker, a retried
    bundle whose writes the runner discarded, a restart) leaves a different token, so a stale
    copy is never used: the state stays the truth, this only saves work.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, Any], tuple[str, _Held]] = {}

    def take(self, entity: str, key: Any, token: str | None) -> _Held | None:
        with self._lock:
            got = self._held.pop((entity, key), None)
        return got[1] if got is not None and token is not None and got[0] == token else None

    def put(self, entity: str, key: Any, token: str, held: _Held) -> None:
        with self._lock:
            self._held[(entity, key)] = (token, held)


_HISTORY_CACHE = _HistoryCache()


class EntityFeaturesFn(beam.DoFn):
    """Exact features of one entity kind, per bucket of entities, once the watermark passes a tick.

    Input ``(bucket, events)``; output ``(txn bucket, (entity, FEATURES | LATE, table))``.

    Timers: one per tick boundary that waiting events need (dynamic timer tags, see
    :func:`flush_times_us`), so that when the watermark moves by many ticks at once, every
    timer it passed fires in the same round; a flush at ``b`` releases every waiting event
    before ``b``, so which timers fire, and in which bundles, changes only how the work is cut.
    """

    PENDING = BagStateSpec("pending", PickleCoder())
    HISTORY = BagStateSpec("history", PickleCoder())
    SHAPE = ReadModifyWriteStateSpec("shape", PickleCoder())        # (pieces in HISTORY, prune due at, token)
    HORIZON = ReadModifyWriteStateSpec("horizon", VarIntCoder())   # every event <= this is emitted
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def __init__(self, *, spec: FeatureSpec, entity: str, anchor: bool, join_buckets: int,
                 emit_every_ms: int = DEFAULT_EMIT_EVERY_MS) -> None:
        if emit_every_ms < 1:
            raise ValueError("emit_every_ms must be at least 1")
        self._spec, self._entity, self._anchor = spec, entity, anchor
        self._defs, self._reach = spec.for_entity(entity), spec.max_window_us
        self._column, self._join_buckets = ENTITY_COLUMNS[entity], join_buckets
        self._tick = emit_every_ms * _US_PER_MS

    def setup(self) -> None:
        refuse_runner_splits()

    def _to_join(self, kind: str, table: pa.Table) -> Iterator[tuple[int, Part]]:
        for bucket, piece in split_by_bucket(table, "txn_id", self._join_buckets):
            yield bucket, (self._entity, kind, piece)

    def process(self, kv: tuple[int, pa.Table], pending=beam.DoFn.StateParam(PENDING),
                horizon=beam.DoFn.StateParam(HORIZON), flush=beam.DoFn.TimerParam(FLUSH)
                ) -> Iterator[tuple[int, Part]]:
        _, table = kv
        t = event_times_us(table)
        done = horizon.read()
        if done is not None:
            late = t <= done
            if late.any():
                yield from self._to_join(LATE, table.filter(pa.array(late)))
                table, t = table.filter(pa.array(~late)), t[~late]
        if table.num_rows == 0:
            return
        pending.add(table)
        for due in flush_times_us(t, self._tick):
            flush.set(Timestamp(micros=due), dynamic_timer_tag=str(due))

    @on_timer(FLUSH)
    def on_flush(self, fired=beam.DoFn.TimestampParam, key=beam.DoFn.KeyParam,
                 pending=beam.DoFn.StateParam(PENDING), history=beam.DoFn.StateParam(HISTORY),
                 shape=beam.DoFn.StateParam(SHAPE), horizon=beam.DoFn.StateParam(HORIZON)
                 ) -> Iterator[tuple[int, Part]]:
        # the watermark has passed every event at or before this (timers come back in whole ms)
        cutoff = fired.micros // _US_PER_MS * _US_PER_MS - 1
        waiting = _concat(pending.read())
        if waiting is None:
            return
        t = event_times_us(waiting)
        is_ready = t <= cutoff
        if not is_ready.any():  # an earlier timer of the same round released them already
            return
        ready, later = waiting.filter(pa.array(is_ready)), waiting.filter(pa.array(~is_ready))
        pieces, prune_at, token = _shape(shape.read())
        held = _HISTORY_CACHE.take(self._entity, key, token) if pieces else None
        if pieces and held is None:
            stored = _concat(history.read())
            held = _Held(stored, self._column) if stored is not None else None
        if held is not None:  # only the ready events' entities matter to their features
            mine = held.rows_of(ready.column(self._column))
            table = pa.concat_tables([mine, ready.select(mine.column_names)])
            first = mine.num_rows
        else:
            table, first = ready, 0
        cols = compute_entity_features(table, self._defs, self._entity)
        part = identity_columns(ready, self._spec) if self._anchor else {}
        part["txn_id"] = ready.column("txn_id")
        for name, arr in cols.items():
            part[name] = arr.slice(first)
        yield from self._to_join(FEATURES, pa.table(part))
        # history: append the ready events; prune (a rewrite) only when events fall out of reach
        floor = cutoff - self._reach
        oldest = int(t[is_ready].min())
        if (prune_at is not None and prune_at <= floor) or pieces + 1 > _MAX_HISTORY_CHUNKS:
            everything = pa.concat_tables([held.table, ready.select(held.table.column_names)]) if held else ready
            keep, prune_at = self._prune(everything, floor)
            history.clear()
            history.add(keep)
            pieces, held = 1, _Held(keep, self._column)
        else:
            history.add(ready)
            pieces += 1
            prune_at = oldest if prune_at is None else min(prune_at, oldest)
            held = held.append(ready) if held is not None else _Held(ready, self._column)
        token = uuid.uuid4().hex
        shape.write((pieces, prune_at, token))
        _HISTORY_CACHE.put(self._entity, key, token, held)
        done = horizon.read()
        horizon.write(cutoff if done is None else max(done, cutoff))
        pending.clear()
        if later.num_rows:  # their timers were set when they arrived
            pending.add(later)

    def _prune(self, table: pa.Table, floor: int) -> tuple[pa.Table, int | None]:
        """Events a later event can still reach: newer than ``floor``, plus each entity's tail."""
        t = event_times_us(table)
        keep = t > floor
        keep[history_tail(table, self._entity)] = True
        kept = table.filter(pa.array(keep))
        windowed = t[t > floor]
        return kept, (int(windowed.min()) if windowed.size else None)


class JoinPartsFn(beam.DoFn):
    """Waits until every entity answered for a txn; emits feature rows, reports late events once.

    Input ``(txn bucket, (entity, FEATURES | LATE, table))``; output feature-row tables and,
    tagged ``late``, one row dict per late event.
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
        held = list(parts.read())
        by_kind: dict[tuple[str, str], list[pa.Table]] = {}
        for entity, kind, table in [*held, new]:
            by_kind.setdefault((entity, kind), []).append(table)
        tables = {k: pa.concat_tables(v) if len(v) > 1 else v[0] for k, v in by_kind.items()}
        ids = {k: set(t.column("txn_id").to_pylist()) for k, t in tables.items()}
        answered = None
        for entity in self._entities:
            got = ids.get((entity, FEATURES), set()) | ids.get((entity, LATE), set())
            answered = got if answered is None else answered & got
        if not answered:  # nothing complete: keep the new part with the others
            parts.add(new)
            return
        late = set()
        for entity in self._entities:
            late |= ids.get((entity, LATE), set()) & answered
        good = answered - late
        if good:  # every entity's part of these txns, each sorted by txn id, side by side
            wanted = pa.array(sorted(good), pa.string())
            cols: dict[str, pa.ChunkedArray] = {}
            for entity in self._entities:
                part = tables[(entity, FEATURES)]
                part = part.filter(pc.is_in(part.column("txn_id"), value_set=wanted))
                part = part.take(pc.sort_indices(part, sort_keys=[("txn_id", "ascending")]))
                for name in part.column_names:
                    cols.setdefault(name, part.column(name))
            yield pa.table(cols).select(self._schema.names).cast(self._schema)
        if late:
            reported: set[str] = set()
            for entity in self._entities:
                table = tables.get((entity, LATE))
                if table is None:
                    continue
                for row in late_rows(table):
                    if row["txn_id"] in late and row["txn_id"] not in reported:
                        reported.add(row["txn_id"])
                        yield pvalue.TaggedOutput(LATE, row)
        parts.clear()
        done = pa.array(sorted(answered), pa.string())
        for (entity, kind), table in tables.items():
            rest = table.filter(pc.invert(pc.is_in(table.column("txn_id"), value_set=done)))
            if rest.num_rows:
                parts.add((entity, kind, rest))


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
