"""The streaming job's steps as plain functions and small state classes, one copy for every runner.

The Beam DoFns (``pipelines/streaming.py``, ``pipelines/stream_job.py``) and the Flink functions call
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
    ``step`` is an :class:`EntityStep` (spec, entity, anchor), built once per operator. The
    released events are newer than every event the history holds (older ones were late), so the
    history keeps each entity's events in (event_time, txn_id) order by appending, and answers a
    flush with its entities' rows without sorting them; the engine evaluates the windows at the
    released events only.
  - ``EntityHistory.from_pieces(pieces, entity)`` rebuilds the history from its state pieces.
* ``join_parts(parts, entities, schema) -> Joined``: the parts ``(entity, FEATURES | LATE,
  table)`` received for one bucket of txn ids (``Part``); ``Joined.rows`` the complete feature
  rows (``schema``), ``Joined.late`` one dict per late event (reported once), ``Joined.keep``
  the parts to keep waiting (state: list of parts). Each entity stage sends for every event it
  received exactly one part row: features, or a late marker (``late_part``).
* ``late_dead_letters(rows, run_id=, recorded_at_us=) -> table``: dead letters of late events.
* ``WorkerCopies``: a worker's copy of each key's state object, used while the token in state
  matches (both adapters keep their histories and seen txn ids in one).

State and its cost: ``SeenTxnIds`` and ``EntityHistory`` are picklable objects (a per-process
lookup set is rebuilt after unpickling). A runner that keeps the object itself (Flink heap or
RocksDB value state, a worker cache) needs nothing else; a runner with list (bag) state applies
each step's :class:`StateChange`: usually one appended piece (the step's own rows), and now and
then a rewrite (``reset``) that drops what fell out of reach. A rewrite happens only when at
least half as many rows can go as stay, or at :data:`MAX_PIECES` pieces, so each row is
rewritten a bounded number of times. A flush's work follows the events it releases and their
entities' histories (each entity's newest and newest located event are kept however old): a
binary search per window and released event, and a few linear numpy passes (gathers, prefix
sums) over those entities' rows.

The Delta micro-batch commit (exactly once) is ``finfeat.jobs.stream_commit.commit_micro_batch``.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.events import EVENT_SCHEMA, MESSAGE_SCHEMA
from finfeat.schemas.features import IDENTITY_COLUMNS
from finfeat.schemas.redaction import opaque_payload
from finfeat.transforms.features import (
    compute_calendar_features,
    compute_entity_features,
    compute_sorted_entity_features,
    frame_fields,
    history_tail,
    sorted_order,
)
from finfeat.transforms.parse import SOURCE, SOURCE_ROW, make_dead_letters
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureDef, FeatureSpec

LATE = "late"
FEATURES = "features"
Part = Tuple[str, str, pa.Table]  # (entity, FEATURES | LATE, table)

MESSAGE_COLUMNS = ("txn_id", "card_token", "merchant_id", "merchant_category", "amount_minor", "currency",
                   "event_time", "channel", "card_lat", "card_lon", "merchant_lat", "merchant_lon", "is_fraud")
_US_PER_DAY = 86_400_000_000
_US_PER_MS = 1000
_DENSE_TIMERS = 16  # up to this many tick timers per batch of new events, else a ladder
#: State pieces (one per flush or batch) are rewritten as one, with what fell out of reach left
#: out, only when at least half as many rows can go as stay (so each row is rewritten a bounded
#: number of times: the work is amortized), or when there are this many pieces.
MAX_PIECES = 4096
_MIN_REWRITE_ROWS = 1024


def _rewrite_due(pieces: int, droppable: int, kept: int) -> bool:
    return pieces + 1 > MAX_PIECES or (droppable >= _MIN_REWRITE_ROWS and 2 * droppable >= kept)


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


class WorkerCopies:
    """This worker's copy of each state object (a bucket's history, its seen txn ids), valid while
    the token the runner's state holds beside it matches.

    Reading a bucket's whole history back from the runner and rebuilding it at every flush cost
    time that grew with the history. Each update writes a fresh random token to state and keeps
    the resulting object here under that token; the next step for the key reads the (small)
    token and uses this copy only if the tokens match. A step takes the copy out while it works
    and puts it back only at its end, so a step that fails leaves no copy behind. Any other
    writer of the state (another worker, a retried bundle whose writes were discarded, a restore
    from a checkpoint) leaves a different token, so a stale copy is never used: the state stays
    the truth, this only saves work. Thread-safe; keys are any hashable value."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Any, tuple[str, Any]] = {}

    def take(self, key: Any, token: str | None) -> Any:
        with self._lock:
            got = self._held.pop(key, None)
        return got[1] if got is not None and token is not None and got[0] == token else None

    def put(self, key: Any, token: str, value: Any) -> None:
        with self._lock:
            self._held[key] = (token, value)


# -- decode -------------------------------------------------------------------------------------

def _text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def _text_column(values: list) -> pa.Array:
    """Field values as text: numbers were read as their text already; booleans and nested values
    (rare, and wrong types for the parser to report) are spelled as JSON."""
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_text(v) for v in values], pa.string())


#: The JSON type of each message field in a well-formed message (the fast path reads these).
_MESSAGE_TYPES = pa.schema([(c, pa.int64() if c == "amount_minor" else pa.bool_() if c == "is_fraud"
                             else pa.float64() if c.endswith(("_lat", "_lon")) else pa.string())
                            for c in ("schema", *MESSAGE_COLUMNS)])


def _decode_all(messages: Sequence[tuple[int, bytes | None]]) -> pa.Table | None:
    """Every message at once through Arrow's JSON reader, or None when any message needs the
    message-by-message path (anything but one flat, well-typed object of this schema per message).

    The parser makes the same of it as of that path's table: numbers and booleans are spelled as
    text again (a double's shortest round-trip spelling, which parses to the same value; only a
    dead letter's payload can show it, as -66 for -66.0), and any doubt (a value of another JSON
    type, a duplicate key, a non-finite or out-of-bounds coordinate, a coordinate so close to 0 that
    Arrow would spell it without an exponent, bad UTF-8, a second object in one message) sends the
    whole poll to the exact path."""
    from pyarrow import json as pa_json

    values = [v for _, v in messages]
    if not all(v and v[:1] == b"{" and v[-1:] == b"}" and b"\n" not in v and b"\r" not in v for v in values):
        return None
    try:
        table = pa_json.read_json(
            pa.BufferReader(b"\n".join(values)),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(1 << 20, 2 * sum(map(len, values)))),
            parse_options=pa_json.ParseOptions(explicit_schema=_MESSAGE_TYPES, unexpected_field_behavior="ignore"))
        table.validate(full=True)  # the reader does not check UTF-8
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError, ValueError):
        return None
    if table.num_rows != len(values):  # each message starts with "{" and ends with "}": one object at least
        return None
    schema = table.column("schema")
    if schema.null_count or not pc.all(pc.equal(schema, MESSAGE_SCHEMA)).as_py():
        return None
    columns = {}
    for name in MESSAGE_COLUMNS:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            # NaN, inf, or a coordinate out of bounds (a dead letter: its payload keeps the text as sent);
            # NaN compares false, so "not |x| <= 180" catches all three in one pass
            magnitude = pc.abs(column)
            if pc.any(pc.invert(pc.less_equal(magnitude, 180))).as_py():
                return None
            # below 1e-4 Arrow spells a double without the exponent that JSON (and Python) use:
            # a dead letter's payload would show another text, and its long run of digits can
            # look like a card number to the payload redaction
            if pc.any(pc.and_(pc.less(magnitude, 1e-4), pc.not_equal(column, 0))).as_py():
                return None
        columns[name] = column.cast(pa.string())
    return pa.table({**columns, SOURCE_ROW: pa.array([o for o, _ in messages], pa.int64())})


def decode_messages(messages: Sequence[tuple[int, bytes | None]], *, source: str, run_id: str,
                    recorded_at_us: int | None = None) -> tuple[pa.Table | None, pa.Table | None]:
    """One poll's messages -> (a raw table for the batch parser, ``unparseable`` dead letters).

    A poll of well-formed messages is read at once (:func:`_decode_all`); any other poll
    message by message, with the same result for the well-formed ones."""
    if messages:
        raw = _decode_all(messages)
        if raw is not None:
            return raw, None
    records: list[dict] = []
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
            # a message that cannot be read keeps no value of it (its fields cannot be told apart)
            bad.append((offset, f"offset {offset}: {exc}", opaque_payload(chars=len(value or b""))))
            continue
        records.append(rec)
        offsets.append(offset)
    dead = None
    if bad:
        dead = make_dead_letters(
            run_id=run_id, stage="read", reasons=["unparseable"] * len(bad), details=[b[1] for b in bad],
            source=source, source_rows=[b[0] for b in bad], txn_ids=[None] * len(bad),
            payloads=[b[2] for b in bad], recorded_at_us=_now_us() if recorded_at_us is None else recorded_at_us)
    raw = None
    if offsets:
        columns = zip(*(tuple(map(r.get, MESSAGE_COLUMNS)) for r in records))
        raw = pa.table({**{c: _text_column(list(v)) for c, v in zip(MESSAGE_COLUMNS, columns)},
                        SOURCE_ROW: pa.array(offsets, pa.int64())})
    return raw, dead


# -- de-duplication -----------------------------------------------------------------------------

class _Growing:
    """A numpy array (int64 unless given another) grown by appends in amortized constant time per
    value (capacity doubles)."""

    def __init__(self, values: np.ndarray | None = None) -> None:
        values = np.zeros(0, dtype=np.int64) if values is None else np.asarray(values)
        if values.dtype.kind in "iu":
            values = values.astype(np.int64, copy=False)
        self._buf, self._n = values.copy(), len(values)

    @property
    def values(self) -> np.ndarray:
        return self._buf[: self._n]

    def append(self, values: np.ndarray) -> None:
        need = self._n + len(values)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf), 1024), dtype=self._buf.dtype)
            grown[: self._n] = self.values
            self._buf = grown
        self._buf[self._n: need] = values
        self._n = need

    def __getstate__(self) -> dict:
        return {"values": self.values.copy()}

    def __setstate__(self, state: dict) -> None:
        self._buf, self._n = state["values"], len(state["values"])


class SeenTxnIds:
    """The txn ids a bucket of txn ids has passed, with their event times, as Arrow pieces
    ``(txn_id string, t int64)``; the runner keeps the pieces in a list (bag) state. Lookups use
    a set of the ids built once per process (not pickled), so a batch costs its own size."""

    def __init__(self, pieces: Iterable[pa.Table] = ()) -> None:
        self.pieces = [p for p in pieces if p.num_rows]
        self._t = _Growing(np.concatenate([p.column("t").to_numpy() for p in self.pieces]) if self.pieces
                           else None)
        self.newest: int | None = int(self.t.max()) if self.t.size else None
        self._ids: set[str] | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ids = None

    @property
    def t(self) -> np.ndarray:
        return self._t.values

    def __len__(self) -> int:
        return len(self.t)

    def _known(self) -> set[str]:
        if self._ids is None:
            self._ids = set()
            for p in self.pieces:
                self._ids.update(p.column("txn_id").to_pylist())
        return self._ids

    def contains(self, ids: pa.Array) -> np.ndarray:
        known = self._known()
        return np.fromiter((i in known for i in ids.to_pylist()), dtype=bool, count=len(ids))

    def add(self, ids: pa.Array | pa.ChunkedArray, t_us: pa.Array | pa.ChunkedArray, *,
            retention_us: int) -> StateChange:
        """Note new ids; forget those ``retention_us`` before the newest when a rewrite is due."""
        entry = pa.table({"txn_id": ids, "t": t_us})
        self._known().update(entry.column("txn_id").to_pylist())
        t = entry.column("t").to_numpy()
        self._t.append(t)
        self.newest = int(t.max()) if self.newest is None else max(self.newest, int(t.max()))
        self.pieces.append(entry)
        floor = self.newest - retention_us
        old = int(np.count_nonzero(self.t <= floor))
        if not _rewrite_due(len(self.pieces) - 1, old, len(self.t) - old):
            return StateChange(reset=False, add=[entry])
        everything = pa.concat_tables(self.pieces)
        keep = self.t > floor
        everything = everything.filter(pa.array(keep)).combine_chunks()
        self.pieces, self._t, self._ids = [everything], _Growing(self.t[keep]), None
        return StateChange(reset=True, add=[everything])


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


def _coded(values: pa.Array | pa.ChunkedArray, code_of: dict[Any, int]) -> np.ndarray:
    """Integer codes of ``values`` from ``code_of``, which gives each new value the next code
    (nulls get code 0: callers keep their validity apart)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    mapping = np.fromiter((code_of.setdefault(k, len(code_of)) for k in encoded.dictionary.to_pylist()),
                          dtype=np.int64, count=len(encoded.dictionary))
    if not len(mapping):  # nothing but nulls
        return np.zeros(len(values), dtype=np.int64)
    return mapping[encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)]


class EntityHistory:
    """A bucket's history: the events its entities' longest window can still reach, plus, however
    old, each entity's newest and newest located event (``history_tail``). The runner's list state
    holds the pieces (:class:`StateChange`); :meth:`from_pieces` rebuilds it from them.

    Held for answering flushes: every event of a flush is newer than every event held (what is
    not is late), so each entity's rows, in arrival order, are in (event_time, txn_id) order when
    each flush's events are appended in that order. An index (rows grouped by entity code, built
    by a stable sort of the codes, plus the rows appended since, found by one vectorized scan)
    gives the rows of a flush's entities without sorting them, and the engine evaluates the
    windows at the released events only (binary searches). The index is rebuilt when the rows
    appended since reach a quarter of those indexed, so its cost per row is amortized.

    Events out of reach are dropped only by a rewrite, and a rewrite happens only when at least
    half as many rows can go as stay (or the state has :data:`MAX_PIECES` pieces): each row is
    rewritten a bounded number of times. So a flush costs the events it releases plus a few
    linear numpy passes over their entities' rows (gathers, prefix sums), not a sort of the
    history or a feature row for every event held.
    """

    def __init__(self, table: pa.Table, entity: str, *, pieces: int = 1, kept_tails: int = 0) -> None:
        self.entity = entity
        self.column = ENTITY_COLUMNS[entity]
        self.pieces = pieces
        self.kept_tails = kept_tails  # rows out of reach that the last rewrite kept (entities' tails)
        self._index(table.combine_chunks())

    @classmethod
    def from_pieces(cls, pieces: Iterable[pa.Table], entity: str) -> EntityHistory | None:
        pieces = [p for p in pieces if p.num_rows]
        table = concat(pieces)
        if table is None:
            return None
        return cls(table, entity, pieces=len(pieces))

    def _index(self, table: pa.Table) -> None:
        """Hold ``table``, put in (entity, event_time, txn_id) order, and index it."""
        self.code_of: dict[Any, int] = {}
        codes = _coded(table.column(self.column), self.code_of)
        order = sorted_order(table, self.column, codes)
        if len(order) and not (order[1:] > order[:-1]).all():
            table, codes = table.take(pa.array(order)).combine_chunks(), codes[order]
        self._blocks = [table]
        self._t = _Growing(event_times_us(table))
        self._codes = _Growing(codes)
        self._fields: dict[str, _Field] = {}
        self._reindex(in_code_order=True)

    def _reindex(self, *, in_code_order: bool = False) -> None:
        """Index every row held: positions grouped by entity code (arrival order within a code).
        The rows appended since the last index are grouped and merged into it (a stable sort of
        two sorted runs, which is a merge)."""
        codes = self.codes
        if in_code_order:
            by_code = np.arange(len(codes), dtype=np.int64)
        else:
            recent = np.arange(self._indexed, len(codes), dtype=np.int64)
            recent = recent[np.argsort(codes[recent], kind="stable")]
            both = np.concatenate([self._by_code, recent])
            by_code = both[np.argsort(codes[both], kind="stable")]
        self._indexed, self._by_code = len(codes), by_code
        self._starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(self.code_of)))])

    @property
    def table(self) -> pa.Table:
        """Every row (one chunk per block: no copy)."""
        return self._blocks[0] if len(self._blocks) == 1 else pa.concat_tables(self._blocks)

    @property
    def num_rows(self) -> int:
        return len(self._t.values)

    @property
    def t(self) -> np.ndarray:
        return self._t.values

    @property
    def codes(self) -> np.ndarray:
        return self._codes.values

    def _field(self, name: str) -> _Field:
        if name not in self._fields:
            self._fields[name] = _Field(self.table.column(name))
        return self._fields[name]

    def layout(self, codes: np.ndarray) -> _Layout:
        """Where a flush's frame takes its rows from: for the entities of ``codes`` (the ready
        events' entity codes, in (entity, event_time, txn_id) order), in code order, each entity's
        rows held (in (event_time, txn_id) order: the indexed ones, then those appended since)
        followed by its ready events. Positions are computed, not sorted for: the indexed rows
        come as ranges of the index, and only the rows appended since it was built are grouped."""
        wanted, first_ready, n_ready = np.unique(codes, return_index=True, return_counts=True)
        m = len(wanted)
        starts = self._starts
        known = wanted < len(starts) - 1
        code = np.where(known, wanted, 0)
        lo = np.where(known, starts[code], 0)
        n_indexed = np.where(known, starts[np.minimum(code + 1, len(starts) - 1)], 0) - lo
        rank_of = np.full(max(len(self.code_of), int(wanted.max(initial=-1)) + 1), -1, dtype=np.int64)
        rank_of[wanted] = np.arange(m)
        recent_rank = rank_of[self.codes[self._indexed:]]
        recent = np.flatnonzero(recent_rank >= 0)
        recent_rank = recent_rank[recent]
        grouped = np.argsort(recent_rank, kind="stable")  # only the rows appended since the index
        recent, recent_rank = self._indexed + recent[grouped], recent_rank[grouped]
        n_recent = np.bincount(recent_rank, minlength=m)
        size = n_indexed + n_recent + n_ready
        offset = np.cumsum(size) - size

        def within(counts: np.ndarray) -> np.ndarray:  # 0, 1, ... inside each entity's run
            return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)

        k = within(n_indexed)
        held = np.concatenate([self._by_code[np.repeat(lo, n_indexed) + k], recent])
        held_at = np.concatenate([np.repeat(offset, n_indexed) + k,
                                  (offset + n_indexed)[recent_rank] + within(n_recent)])
        ready_rank = np.repeat(np.arange(m), n_ready)
        ready_at = (offset + n_indexed + n_recent)[ready_rank] + (np.arange(len(codes)) - first_ready[ready_rank])
        return _Layout(np.repeat(np.arange(m, dtype=np.int64), size), held, held_at, ready_at)

    def features(self, ready: pa.Table, codes: np.ndarray, defs: Sequence[FeatureDef]) -> dict[str, pa.Array]:
        """The features of ``ready`` (events newer than every row held, in (entity, event_time,
        txn_id) order; ``codes`` their entity codes) over their entities' rows held plus
        themselves, aligned with ``ready``."""
        frame = self.layout(codes)
        t = np.empty(len(frame.group), dtype=np.int64)
        t[frame.held_at] = self.t[frame.held]
        t[frame.ready_at] = event_times_us(ready)
        columns = {name: self._field(name).frame_column(frame, ready.column(name))
                   for name in frame_fields(defs, ready.column_names)}
        got = compute_sorted_entity_features(frame.group, t, columns, defs, frame.ready_at)
        return {f.name: pa.array(got[f.name][0], type=f.arrow_type, mask=~got[f.name][1]) for f in defs}

    def _append(self, ready: pa.Table, codes: np.ndarray) -> None:
        self._codes.append(codes)
        self._t.append(event_times_us(ready))
        for name, held in self._fields.items():
            held.append(ready.column(name))
        # blocks shrink geometrically (each more than twice the next), merged like a binary
        # counter: O(log rows) blocks, and each row is copied O(log rows) times in all
        blocks = self._blocks
        blocks.append(ready.combine_chunks())
        while len(blocks) > 1 and blocks[-2].num_rows <= 2 * blocks[-1].num_rows:
            last = blocks.pop()
            blocks[-1] = pa.concat_tables([blocks[-1], last]).combine_chunks()
        if self.num_rows - self._indexed > max(_MIN_REWRITE_ROWS, self._indexed // 4):
            self._reindex()

    def codes_of(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The entity codes of these keys (new keys get new codes)."""
        return _coded(keys, self.code_of)

    def add(self, ready: pa.Table, *, floor: int, codes: np.ndarray) -> StateChange:
        """Append released events (in (entity, event_time, txn_id) order, all newer than every
        row held); rewrite without what is out of reach (at or before ``floor``, entities' tails
        excepted) when that is due."""
        kept = ready.select(self._blocks[0].column_names)  # the columns this history keeps
        self._append(kept, codes)
        self.pieces += 1
        droppable = int(np.count_nonzero(self.t <= floor)) - self.kept_tails
        if not _rewrite_due(self.pieces - 1, droppable, self.num_rows - droppable):
            return StateChange(reset=False, add=[kept])
        keep = _prune(self.table, self.t, floor, self.entity).combine_chunks()
        self.pieces = 1
        self._index(keep)
        self.kept_tails = int(np.count_nonzero(self.t <= floor))
        return StateChange(reset=True, add=[keep])


@dataclass(frozen=True)
class _Layout:
    """A flush's frame (see :meth:`EntityHistory.layout`): ``group`` of each frame row (entity
    rank, from 0), the positions ``held`` of the history rows it takes and where they go
    (``held_at``), and where the ready events go (``ready_at``, ascending)."""

    group: np.ndarray
    held: np.ndarray
    held_at: np.ndarray
    ready_at: np.ndarray


class _Field:
    """One event column of a history as the engine's array frame takes it (see
    ``compute_sorted_entity_features``): text as integer codes (equal text, equal code), numbers
    and flags as numpy values with their validity, grown as events are appended."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        typ = column.type
        self.text = pa.types.is_string(typ) or pa.types.is_large_string(typ)
        self.floats = pa.types.is_floating(typ)
        self.code_of: dict[Any, int] = {}
        values, valid = self._convert(column)
        self._values = _Growing(values)
        self._valid = _Growing(valid)

    def _convert(self, column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        if self.text:
            return _coded(column, self.code_of), valid
        if self.floats:
            return column.fill_null(0.0).to_numpy(zero_copy_only=False), valid
        if pa.types.is_boolean(column.type):
            return column.fill_null(False).to_numpy(zero_copy_only=False), valid
        return column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), valid

    def append(self, column: pa.ChunkedArray) -> None:
        values, valid = self._convert(column)
        self._values.append(values)
        self._valid.append(valid)

    def frame_column(self, frame: _Layout, ready: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """This column of the frame: the rows held and ``ready``'s, placed as ``frame`` says."""
        values, valid = self._convert(ready)
        out = np.empty(len(frame.group), dtype=values.dtype)
        ok = np.empty(len(frame.group), dtype=bool)
        out[frame.held_at], ok[frame.held_at] = self._values.values[frame.held], self._valid.values[frame.held]
        out[frame.ready_at], ok[frame.ready_at] = values, valid
        if self.text:  # a missing text value equals no other: its own negative code
            missing = np.flatnonzero(~ok)
            out[missing] = -1 - np.arange(len(missing))
            ok[:] = True
        return out, ok


def _prune(table: pa.Table, t: np.ndarray, floor: int, entity: str) -> pa.Table:
    """Events a later event can still reach: newer than ``floor``, plus each entity's tail."""
    keep = t > floor
    keep[history_tail(table, entity)] = True
    return table.filter(pa.array(keep))


@dataclass(frozen=True)
class EntityStep:
    """What a flush of one entity kind needs, built once per operator."""

    spec: FeatureSpec
    entity: str
    anchor: bool  # this entity's part carries the identity and calendar columns

    @property
    def reach_us(self) -> int:
        return self.spec.max_window_us

    @cached_property
    def history_columns(self) -> list[str]:
        """The event columns a history keeps: what the entity's features read (the key, the
        time, the txn id for ties, the fields; merchant coordinates only for geo velocity)."""
        defs = self.spec.for_entity(self.entity)
        geo = ["merchant_lat", "merchant_lon"] if any(f.agg == "geo_velocity" for f in defs) else []
        return list(dict.fromkeys(["txn_id", "event_time", ENTITY_COLUMNS[self.entity],
                                   *frame_fields(defs, EVENT_SCHEMA.names), *geo]))


@dataclass(frozen=True)
class Flush:
    part: pa.Table
    later: pa.Table | None
    history: EntityHistory
    change: StateChange


def entity_part(ready: pa.Table, history: EntityHistory | None, step: EntityStep,
                codes: np.ndarray | None = None) -> pa.Table:
    """The features of one entity kind for the released events (``ready``, in (entity,
    event_time, txn_id) order when there is a history; ``codes`` their entity codes in it),
    computed by the engine on those events plus their entities' history."""
    defs = step.spec.for_entity(step.entity)
    if history is None:
        cols = compute_entity_features(ready, defs, step.entity)
    else:
        cols = history.features(ready, codes, defs)
    part = identity_columns(ready, step.spec) if step.anchor else {}
    part["txn_id"] = ready.column("txn_id")
    part.update(cols)
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
    floor = cutoff - step.reach_us
    if history is None:
        part = entity_part(ready, None, step)
        kept = ready.select(step.history_columns)
        history = EntityHistory(kept, step.entity)
        change = StateChange(reset=False, add=[kept])
    else:  # the history answers, and keeps, each entity's events in (event_time, txn_id) order
        codes = history.codes_of(ready.column(history.column))
        order = sorted_order(ready, history.column, codes)
        ready, codes = ready.take(pa.array(order)), codes[order]
        part = entity_part(ready, history, step, codes)
        change = history.add(ready, floor=floor, codes=codes)
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
