"""The streaming job's steps as plain functions and small state classes, one copy for every runner.

The Beam DoFns (``pipelines/streaming.py``, ``jobs/stream.py``) and the Flink functions call
these and only move state in and out of their runner. Imports: numpy, pyarrow (16.1 or
newer), finfeat's transforms and schemas; nothing of Beam, Flink or delta-rs. Every state
piece is an Arrow table or a plain value, so plain pickle (Beam's ``PickleCoder``, bytes in
Flink keyed state) carries it; :func:`table_to_bytes` / :func:`table_from_bytes` give Arrow
IPC for a runner that wants bytes.

API (t = event time, int64 µs since the epoch, UTC):

* ``decode_messages(messages, source=, run_id=, recorded_at_us=) -> (raw | None, dead | None)``:
  one poll's ``[(offset, value bytes)]`` of a partition (``source`` = ``"topic/partition"``)
  -> a raw string table for ``transforms.parse.parse_batch`` (``canonical`` mapping,
  ``_source_row`` = offset) and ``unparseable`` dead letters. Stateless.
* ``drop_repeated(table, seen, run_id=, retention_us=, recorded_at_us=) -> Dedup``: parsed
  events (with ``_source``/``_source_row``) of one bucket of txn ids (``transforms.buckets``),
  against ``seen: SeenTxnIds`` (keyed state of that bucket). ``Dedup.fresh`` (first deliveries,
  without the source columns), ``Dedup.dead`` (``duplicate_txn_id`` dead letters),
  ``Dedup.change`` (a :class:`StateChange` for the runner's list/bag state of seen pieces;
  ``seen`` itself is updated in place, so an adapter that keeps the object needs no more).
* Entity buckets (one per ``(entity kind, bucket of entity keys)``; state: pending events, the
  history, the horizon = the newest cutoff flushed):
  - ``split_late(table, horizon) -> (on_time | None, late | None)``: events at or before the
    horizon are late (their entities' features were already final past them).
  - ``flush_times_us(t, tick_us) -> [µs]``: the event-time timers to set for new pending events.
  - ``cutoff_of_timer_us(fired_us) -> µs``: every event at or before it is final once a timer
    set at ``fired_us`` fires (timers come back in whole milliseconds on portable runners).
  - ``flush_bucket(pending, history, cutoff, step=) -> Flush | None``: the pending events at or
    before ``cutoff`` are released: ``Flush.part`` their features (one table: txn_id, the entity's
    features, and for the anchor entity the identity and calendar columns), ``Flush.later`` the
    pending events to keep, ``Flush.change`` the change of the history's list/bag state;
    ``history`` (an :class:`EntityHistory`, or None when empty) is updated in place, and
    ``Flush.history`` is the object to keep. The new horizon is ``max(horizon, cutoff)``.
    ``step`` is an :class:`EntityStep` (spec, entity, anchor), built once per operator.
  - ``EntityHistory.from_pieces(pieces, entity)`` rebuilds the history from its state pieces.
* ``join_parts(parts, entities, schema) -> Joined``: the parts ``(entity, FEATURES | LATE,
  table)`` received for one bucket of txn ids (``Part``); ``Joined.rows`` the complete feature
  rows (``schema``), ``Joined.late`` one dict per late event (reported once), ``Joined.keep``
  the parts to keep waiting (state: list of parts). Each entity stage sends for every event it
  received exactly one part row: features, or a late marker (``late_part``).
* ``late_dead_letters(rows, run_id=, recorded_at_us=) -> table``: dead letters of late events.

The Delta micro-batch commit (exactly once) is ``finfeat.jobs.stream_commit.commit_micro_batch``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.events import EVENT_SCHEMA, MESSAGE_SCHEMA
from finfeat.schemas.features import IDENTITY_COLUMNS
from finfeat.transforms.features import compute_calendar_features, compute_entity_features, history_tail
from finfeat.transforms.parse import SOURCE, SOURCE_ROW, make_dead_letters
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec

LATE = "late"
FEATURES = "features"
Part = Tuple[str, str, pa.Table]  # (entity, FEATURES | LATE, table)

MESSAGE_COLUMNS = ("txn_id", "card_token", "merchant_id", "merchant_category", "amount_minor", "currency",
                   "event_time", "channel", "card_lat", "card_lon", "merchant_lat", "merchant_lon", "is_fraud")
_US_PER_DAY = 86_400_000_000
_US_PER_MS = 1000
_DENSE_TIMERS = 16  # up to this many tick timers per batch of new events, else a ladder
_MAX_HISTORY_PIECES = 64  # history is appended per flush and compacted past this many pieces
_MAX_SEEN_PIECES = 64


def _now_us() -> int:
    return int(time.time() * 1e6)


# -- state transport ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StateChange:
    """How a step changed a list (bag) of state pieces: clear it first when ``reset``, then
    append ``add``. A runner applies it to its list state; the step's object is already updated."""

    reset: bool
    add: list[pa.Table] = field(default_factory=list)


def table_to_bytes(table: pa.Table) -> bytes:
    """An Arrow table as IPC stream bytes (for runners that keep state as bytes)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def concat(tables: Iterable[pa.Table | None]) -> pa.Table | None:
    """The non-empty tables as one (None when there are none)."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


# -- decode -------------------------------------------------------------------------------------

def _text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def decode_messages(messages: Sequence[tuple[int, bytes | None]], *, source: str, run_id: str,
                    recorded_at_us: int | None = None) -> tuple[pa.Table | None, pa.Table | None]:
    """One poll's messages -> (a raw table for the batch parser, ``unparseable`` dead letters)."""
    columns: dict[str, list] = {c: [] for c in MESSAGE_COLUMNS}
    offsets: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for offset, value in messages:
        try:
            rec = json.loads(value, parse_float=str, parse_int=str)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            if rec.get("schema") != MESSAGE_SCHEMA:
                raise ValueError(f"schema {rec.get('schema')!r} is not {MESSAGE_SCHEMA}")
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            text = value.decode("utf-8", "replace")[:4000] if value else ""
            bad.append((offset, f"offset {offset}: {exc}", text))
            continue
        for c in MESSAGE_COLUMNS:
            columns[c].append(_text(rec.get(c)))
        offsets.append(offset)
    dead = None
    if bad:
        dead = make_dead_letters(
            run_id=run_id, stage="read", reasons=["unparseable"] * len(bad), details=[b[1] for b in bad],
            source=source, source_rows=[b[0] for b in bad], txn_ids=[None] * len(bad),
            payloads=[b[2] for b in bad], recorded_at_us=_now_us() if recorded_at_us is None else recorded_at_us)
    raw = None
    if offsets:
        raw = pa.table({**{c: pa.array(v, pa.string()) for c, v in columns.items()},
                        SOURCE_ROW: pa.array(offsets, pa.int64())})
    return raw, dead


# -- de-duplication -----------------------------------------------------------------------------

class SeenTxnIds:
    """The txn ids a bucket of txn ids has passed, with their event times, as Arrow pieces
    ``(txn_id string, t int64)``; the runner keeps the pieces in a list (bag) state."""

    def __init__(self, pieces: Iterable[pa.Table] = ()) -> None:
        self.pieces = [p for p in pieces if p.num_rows]

    def __len__(self) -> int:
        return sum(p.num_rows for p in self.pieces)

    def contains(self, ids: pa.Array) -> np.ndarray:
        if not self.pieces:
            return np.zeros(len(ids), dtype=bool)
        known = pa.concat_tables(self.pieces).column("txn_id")
        return pc.is_in(ids, value_set=known).to_numpy(zero_copy_only=False)

    def add(self, ids: pa.Array | pa.ChunkedArray, t_us: pa.Array | pa.ChunkedArray, *,
            retention_us: int) -> StateChange:
        entry = pa.table({"txn_id": ids, "t": t_us})
        if len(self.pieces) + 1 > _MAX_SEEN_PIECES:
            everything = pa.concat_tables([*self.pieces, entry])
            newest = pc.max(everything.column("t")).as_py()
            everything = everything.filter(pc.greater(everything.column("t"), newest - retention_us))
            self.pieces = [everything]
            return StateChange(reset=True, add=[everything])
        self.pieces.append(entry)
        return StateChange(reset=False, add=[entry])


@dataclass(frozen=True)
class Dedup:
    fresh: pa.Table | None
    dead: pa.Table | None
    change: StateChange | None


def drop_repeated(table: pa.Table, seen: SeenTxnIds, *, run_id: str, retention_us: int,
                  recorded_at_us: int | None = None) -> Dedup:
    """The first delivery of each txn id passes; repeats (against ``seen`` and within the batch)
    become ``duplicate_txn_id`` dead letters. Ids older than ``retention_us`` before the newest
    are forgotten when the state is compacted (a copy that old is ``late`` for the features)."""
    ids = table.column("txn_id").combine_chunks()
    repeat = seen.contains(ids)
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    in_batch = np.ones(table.num_rows, dtype=bool)
    in_batch[first] = False
    repeat |= in_batch
    fresh = table.filter(pa.array(~repeat))
    change = None
    if fresh.num_rows:
        change = seen.add(fresh.column("txn_id"), fresh.column("event_time").cast(pa.int64()),
                          retention_us=retention_us)
        fresh = fresh.drop_columns([c for c in (SOURCE, SOURCE_ROW) if c in fresh.column_names])
    dead = None
    if repeat.any():
        dups = table.filter(pa.array(repeat))
        payload = dups.drop_columns([SOURCE, SOURCE_ROW]).to_pylist()
        dead = make_dead_letters(
            run_id=run_id, stage="dedup", reasons=["duplicate_txn_id"] * dups.num_rows,
            details=["txn id delivered again; the first delivery was kept"] * dups.num_rows,
            source=dups.column(SOURCE).to_pylist(), source_rows=dups.column(SOURCE_ROW).to_pylist(),
            txn_ids=dups.column("txn_id").to_pylist(),
            payloads=[json.dumps(p, default=str, sort_keys=True) for p in payload],
            recorded_at_us=_now_us() if recorded_at_us is None else recorded_at_us)
    return Dedup(fresh if fresh.num_rows else None, dead, change)


# -- entity buckets -----------------------------------------------------------------------------

def event_times_us(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("event_time").cast(pa.int64()).to_numpy(), dtype=np.int64)


def as_events(table: pa.Table) -> pa.Table:
    """The canonical event columns only, in the canonical schema (every piece concatenates)."""
    return table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


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


def cutoff_of_timer_us(fired_us: int) -> int:
    """Every event at or before the result is final when a watermark timer set at a tick
    boundary fires at ``fired_us`` (portable runners return timers in whole milliseconds)."""
    return fired_us // _US_PER_MS * _US_PER_MS - 1


def split_late(table: pa.Table, horizon: int | None) -> tuple[pa.Table | None, pa.Table | None]:
    """(on-time events, late events): late = at or before the bucket's horizon."""
    if horizon is None:
        return (table if table.num_rows else None), None
    late = event_times_us(table) <= horizon
    if not late.any():
        return (table if table.num_rows else None), None
    on_time = table.filter(pa.array(~late))
    return (on_time if on_time.num_rows else None), table.filter(pa.array(late))


def late_rows(table: pa.Table) -> list[dict]:
    """Late events as the late output carries them: the event's columns plus ``event_time_us``."""
    rows = table.to_pylist()
    for row, t in zip(rows, event_times_us(table).tolist()):
        row["event_time_us"] = t
    return rows


def identity_columns(events: pa.Table, spec: FeatureSpec) -> dict[str, pa.Array]:
    """The identity part of the feature row and the calendar features, for every event."""
    cols: dict[str, Any] = {}
    days = event_times_us(events) // _US_PER_DAY
    for name in IDENTITY_COLUMNS:
        cols[name] = (pa.array(days.astype(np.int32)).cast(pa.date32()) if name == "event_date"
                      else events.column(name))
    cols.update(compute_calendar_features(events, spec.for_entity("event")))
    return cols


class EntityHistory:
    """A bucket's history: the events its entities' longest window can still reach, plus, however
    old, each entity's newest and newest located event (``history_tail``). Entity keys are held as
    integer codes, to pick an entity's rows fast. Picklable; the runner's list state holds the
    pieces (:class:`StateChange`), :meth:`from_pieces` rebuilds it from them."""

    _COMBINE_AT = 16  # chunks: appends add one each; past this the table is made contiguous

    def __init__(self, table: pa.Table, entity: str, *, pieces: int = 1, prune_at: int | None = None) -> None:
        self.entity = entity
        self.column = ENTITY_COLUMNS[entity]
        self.pieces = pieces
        self.prune_at = prune_at
        self._index(table.combine_chunks())

    @classmethod
    def from_pieces(cls, pieces: Iterable[pa.Table], entity: str) -> EntityHistory | None:
        pieces = [p for p in pieces if p.num_rows]
        table = concat(pieces)
        if table is None:
            return None
        # prune_at: the oldest event that is not in an entity's tail; a rebuild may prune early
        return cls(table, entity, pieces=len(pieces), prune_at=int(event_times_us(table).min()))

    def _index(self, table: pa.Table) -> None:
        self.table = table
        encoded = pc.dictionary_encode(table.column(self.column).combine_chunks())
        self.codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.code_of = {k: i for i, k in enumerate(encoded.dictionary.to_pylist())}

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def rows_of(self, keys: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The history rows of these entity keys."""
        wanted = [self.code_of[k] for k in set(keys.to_pylist()) if k in self.code_of]
        if not wanted:
            return self.table.slice(0, 0)
        return self.table.take(pa.array(np.flatnonzero(np.isin(self.codes, wanted))))

    def _append(self, ready: pa.Table) -> None:
        code_of = self.code_of
        new = np.fromiter((code_of.setdefault(k, len(code_of)) for k in ready.column(self.column).to_pylist()),
                          dtype=np.int64, count=ready.num_rows)
        self.codes = np.concatenate([self.codes, new])
        table = pa.concat_tables([self.table, ready.select(self.table.column_names)])
        self.table = table.combine_chunks() if table.column(0).num_chunks > self._COMBINE_AT else table

    def add(self, ready: pa.Table, *, floor: int) -> StateChange:
        """Append released events; prune (a rewrite) when events fell out of reach (at or before
        ``floor``) or the state has too many pieces."""
        oldest = int(event_times_us(ready).min())
        if (self.prune_at is not None and self.prune_at <= floor) or self.pieces + 1 > _MAX_HISTORY_PIECES:
            everything = pa.concat_tables([self.table, ready.select(self.table.column_names)])
            keep, self.prune_at = _prune(everything, floor, self.entity)
            self.pieces = 1
            self._index(keep.combine_chunks())
            return StateChange(reset=True, add=[keep])
        self.pieces += 1
        self.prune_at = oldest if self.prune_at is None else min(self.prune_at, oldest)
        self._append(ready)
        return StateChange(reset=False, add=[ready])


def _prune(table: pa.Table, floor: int, entity: str) -> tuple[pa.Table, int | None]:
    """Events a later event can still reach: newer than ``floor``, plus each entity's tail."""
    t = event_times_us(table)
    keep = t > floor
    keep[history_tail(table, entity)] = True
    kept = table.filter(pa.array(keep))
    windowed = t[t > floor]
    return kept, (int(windowed.min()) if windowed.size else None)


@dataclass(frozen=True)
class EntityStep:
    """What a flush of one entity kind needs, built once per operator."""

    spec: FeatureSpec
    entity: str
    anchor: bool  # this entity's part carries the identity and calendar columns

    @property
    def reach_us(self) -> int:
        return self.spec.max_window_us


@dataclass(frozen=True)
class Flush:
    part: pa.Table
    later: pa.Table | None
    history: EntityHistory
    change: StateChange


def entity_part(ready: pa.Table, history: EntityHistory | None, step: EntityStep) -> pa.Table:
    """The features of one entity kind for the released events, computed by the engine on
    those events plus their entities' history."""
    column = ENTITY_COLUMNS[step.entity]
    if history is not None:  # only the ready events' entities matter to their features
        mine = history.rows_of(ready.column(column))
        table = pa.concat_tables([mine, ready.select(mine.column_names)])
        first = mine.num_rows
    else:
        table, first = ready, 0
    cols = compute_entity_features(table, step.spec.for_entity(step.entity), step.entity)
    part = identity_columns(ready, step.spec) if step.anchor else {}
    part["txn_id"] = ready.column("txn_id")
    for name, arr in cols.items():
        part[name] = arr.slice(first)
    return pa.table(part)


def flush_bucket(pending: pa.Table | None, history: EntityHistory | None, cutoff: int, *,
                 step: EntityStep) -> Flush | None:
    """Release the pending events at or before ``cutoff``: their features, the events still
    pending, and the history with them added (``history`` is updated in place). None when
    nothing is ready (an earlier timer of the same round released them already)."""
    if pending is None or pending.num_rows == 0:
        return None
    t = event_times_us(pending)
    is_ready = t <= cutoff
    if not is_ready.any():
        return None
    ready, later = pending.filter(pa.array(is_ready)), pending.filter(pa.array(~is_ready))
    part = entity_part(ready, history, step)
    floor = cutoff - step.reach_us
    if history is None:
        history = EntityHistory(ready, step.entity, pieces=1, prune_at=int(t[is_ready].min()))
        change = StateChange(reset=False, add=[ready])
    else:
        change = history.add(ready, floor=floor)
    return Flush(part, later if later.num_rows else None, history, change)


# -- the join of per-entity parts -----------------------------------------------------------------

def late_part(entity: str, late: pa.Table) -> Part:
    return entity, LATE, late


@dataclass(frozen=True)
class Joined:
    rows: pa.Table | None
    late: list[dict]
    keep: list[Part]


def join_parts(parts: Sequence[Part], entities: Sequence[str], schema: pa.Schema) -> Joined:
    """Complete feature rows for every txn id each entity answered; late events once."""
    by_kind: dict[tuple[str, str], list[pa.Table]] = {}
    for entity, kind, table in parts:
        by_kind.setdefault((entity, kind), []).append(table)
    tables = {k: pa.concat_tables(v) if len(v) > 1 else v[0] for k, v in by_kind.items()}
    ids = {k: set(t.column("txn_id").to_pylist()) for k, t in tables.items()}
    answered = None
    for entity in entities:
        got = ids.get((entity, FEATURES), set()) | ids.get((entity, LATE), set())
        answered = got if answered is None else answered & got
    if not answered:
        return Joined(None, [], list(parts))
    late = set()
    for entity in entities:
        late |= ids.get((entity, LATE), set()) & answered
    good = answered - late
    rows = None
    if good:  # every entity's part of these txns, each sorted by txn id, side by side
        wanted = pa.array(sorted(good), pa.string())
        cols: dict[str, pa.ChunkedArray] = {}
        for entity in entities:
            part = tables[(entity, FEATURES)]
            part = part.filter(pc.is_in(part.column("txn_id"), value_set=wanted))
            part = part.take(pc.sort_indices(part, sort_keys=[("txn_id", "ascending")]))
            for name in part.column_names:
                cols.setdefault(name, part.column(name))
        rows = pa.table(cols).select(schema.names).cast(schema)
    reported: list[dict] = []
    if late:
        seen: set[str] = set()
        for entity in entities:
            table = tables.get((entity, LATE))
            if table is None:
                continue
            for row in late_rows(table):
                if row["txn_id"] in late and row["txn_id"] not in seen:
                    seen.add(row["txn_id"])
                    reported.append(row)
    done = pa.array(sorted(answered), pa.string())
    keep: list[Part] = []
    for (entity, kind), table in tables.items():
        rest = table.filter(pc.invert(pc.is_in(table.column("txn_id"), value_set=done)))
        if rest.num_rows:
            keep.append((entity, kind, rest))
    return Joined(rows, reported, keep)


def late_dead_letters(rows: Sequence[dict], *, run_id: str, recorded_at_us: int | None = None) -> pa.Table:
    """``late`` dead letters for late events as :func:`join_parts` reports them."""
    if not rows:
        return DEAD_LETTER_SCHEMA.empty_table()
    return make_dead_letters(
        run_id=run_id, stage="late", reasons=["late"] * len(rows),
        details=["arrived after features of later events were final; the next backfill repairs its day"] * len(rows),
        source="stream", source_rows=[-1] * len(rows), txn_ids=[r["txn_id"] for r in rows],
        payloads=[json.dumps({k: v for k, v in r.items() if k != "event_time_us"}, default=str, sort_keys=True)
                  for r in rows],
        recorded_at_us=_now_us() if recorded_at_us is None else recorded_at_us)
