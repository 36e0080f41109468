"""The online store's one abstract class, its typed results and errors, and the retention rule.

What is stored (per entity kind of the spec, e.g. card and merchant) is not a feature vector
but the entity's recent canonical events: exactly what the entity's windows can still reach.
A lookup then runs the batch engine on that history plus the candidate transaction (see
:mod:`finfeat.jobs.online.lookup`), so serving computes the very row the backfill writes.

Retention, for an entity whose state is as of ``asof`` (its newest event time) and whose
longest window is ``reach``, with ``H = asof - reach``:

* every event with ``event_time > H``;
* the newest event with ``event_time <= H`` (the "anchor": ``seconds_since_last`` of a later
  transaction needs the entity's previous event however old it is);
* the newest *located* event with ``event_time <= H`` (``geo_velocity`` needs the latest
  located event however old it is).

This set is a function of the set of events written, whatever their order, so the state is
the same whether events arrive in order, shuffled, repeated or from concurrent writers.
Each state also records ``pruned_max_us``, the newest event time ever dropped, which tells a
lookup whether it can still be exact for a candidate older than the state (see
:meth:`EntityState.exact_for`).

Writes are monotonic: ``asof`` only moves forward, an event is inserted once per txn id (a
re-write is a no-op; the first copy written wins, so feed deduplicated events, as the
backfill and the stream produce), and an older event never displaces a newer one.

Keys expire ``ttl_s`` after their last write, on the writer's wall clock (``now_us`` + TTL,
never shortened by a later write); an expired key reads as absent (:class:`KeyNotFound`, or
:class:`KeyExpired` where the backend still knows), never as stale data, and the next write
starts it afresh. Choose the TTL longer than the longest window: a key idle for longer then
holds nothing any window could reach, and only ``seconds_since_last`` / geo velocity of its
next transaction lose their anchor, which the lookup reports as a missing key, not as a guess.
Materializing history (e.g. the 2019 demo data) keeps it for ``ttl_s`` from the moment it is
materialized.

Labels (label-aware features such as ``merchant_fraud_rate_7d``): an entity kind with such a
feature also keeps each event's own ``is_fraud`` (a label that came with the event, known
``delay`` after it), and the store keeps one label record per transaction from a labels feed
(:meth:`OnlineStore.write_labels`: ``txn_id``, ``is_fraud``, ``label_time``, ``source``). As in
the backfill's :func:`finfeat.transforms.labels.attach_labels`, a feed label wins over the
event's, and among feed labels the latest ``label_time`` wins (then the larger source name);
label writes are idempotent and order-independent too. A lookup hands the engine each stored
event with its effective label and label time, so the engine's rule (a label counts only when
known before the candidate) is applied by the same code as in batch. A label may arrive before
its transaction: it waits in the store. Label records expire ``max(ttl, longest label-aware
reach)`` after their last write, so a label lives as long as the event it labels can be in a
window.
"""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa

from finfeat.schemas.events import EVENT_SCHEMA, TransactionEvent, events_to_table
from finfeat.transforms.features import frame_fields
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec

#: Layout version of the stored state; part of every key / the SQLite schema.
LAYOUT_VERSION = 1
#: Keys live this long after their last write (wall clock) unless the store is told otherwise.
DEFAULT_TTL_S = 35 * 86_400
_GEO_FIELDS = ("merchant_lat", "merchant_lon")
#: Source name of feed labels that reach the store without one (e.g. attached to backfill events);
#: it sorts before every named source, so a named source wins a tie on label time.
UNNAMED_SOURCE = ""


# --------------------------------------------------------------------------------------- errors


class OnlineStoreError(Exception):
    """Base class of every error the online store raises."""


class StoreUnavailable(OnlineStoreError):
    """The store cannot be reached or did not answer in time; nothing was read from it.

    On a write, the batch in flight may or may not have been applied (each entity update is
    atomic, and on Redis each batch is one MULTI/EXEC); writes are idempotent, so re-running
    the write or the materialization is the recovery.
    """

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(f"online store {store} is unavailable: {detail}")
        self.store, self.detail = store, detail


class KeyNotFound(OnlineStoreError, LookupError):
    """No state for an entity: it was never written (a new card or merchant) or it expired."""

    reason = "not_found"

    def __init__(self, entity: str, key: str, detail: str = "") -> None:
        what = detail or "no state (never written, or expired and removed by the store)"
        super().__init__(f"{entity} {key!r}: {what}")
        self.entity, self.key = entity, key


class KeyExpired(KeyNotFound):
    """The entity's state exists but its TTL has passed: it is not served (backends that keep
    expired rows until they are purged, i.e. SQLite, say so; Redis has already deleted them)."""

    reason = "expired"

    def __init__(self, entity: str, key: str, expired_at_us: int) -> None:
        super().__init__(entity, key, f"state expired at {_iso(expired_at_us)} (no write within the TTL)")
        self.expired_at_us = expired_at_us


class CandidateBeforeState(OnlineStoreError):
    """The candidate's time is so far before the stored state's as-of time that events its
    windows need were already pruned: an exact answer needs the batch path."""

    def __init__(self, entity: str, key: str, at_us: int, as_of_us: int, pruned_max_us: int | None) -> None:
        super().__init__(
            f"{entity} {key!r}: the candidate at {_iso(at_us)} is older than the online state "
            f"(as of {_iso(as_of_us)}, events up to {_iso(pruned_max_us)} already pruned); "
            "the store serves exact features only for candidates its retained history covers")
        self.entity, self.key, self.at_us, self.as_of_us = entity, key, at_us, as_of_us
        self.pruned_max_us = pruned_max_us


class StoreSpecMismatch(OnlineStoreError):
    """The store holds state written for a different retention (feature spec) than the caller's."""


def _iso(us: int | None) -> str:
    if us is None:
        return "-"
    from datetime import datetime, timezone

    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def wall_clock_us() -> int:
    """Microseconds since the Unix epoch, UTC, from the wall clock."""
    return time.time_ns() // 1000


# ------------------------------------------------------------------------------------ retention


@dataclass(frozen=True)
class Retention:
    """What one entity kind keeps: its longest window and the event fields its features read."""

    entity: str
    reach_us: int
    fields: tuple[str, ...]
    labels: bool = False  # has label-aware features: reads the label records of its events

    @property
    def key_column(self) -> str:
        return ENTITY_COLUMNS[self.entity]

    @property
    def keeps_location(self) -> bool:
        return all(f in self.fields for f in _GEO_FIELDS)

    @property
    def times_only(self) -> bool:
        """Whether its features read nothing of an event but its id and time (e.g. a merchant's
        counts): no field, no location, no labels. Such a state reads as :class:`EventTimes`."""
        return not self.fields and not self.labels

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"reach_us": self.reach_us, "fields": list(self.fields)}
        if self.labels:
            out["labels"] = True
        return out


def retention_for(spec: FeatureSpec) -> dict[str, Retention]:
    """Per entity kind of ``spec``: the reach (longest window) and the fields to store."""
    out: dict[str, Retention] = {}
    for entity in spec.entities:
        defs = spec.for_entity(entity)
        reach = max(d.reach_us for d in defs)  # window (plus label delay, for features that have one)
        fields = tuple(frame_fields(defs, EVENT_SCHEMA.names))  # what the engine reads, canonical order
        out[entity] = Retention(entity=entity, reach_us=reach, fields=fields,
                                labels=any(d.agg == "fraud_rate" for d in defs))
    return out


def retention_json(retention: Mapping[str, Retention]) -> str:
    return json.dumps({"layout": LAYOUT_VERSION, **{k: r.as_json() for k, r in sorted(retention.items())}},
                      sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------ stored records


class StoredEvent(NamedTuple):
    """One event in an entity's state: id, time, whether it has coordinates, the kept fields."""

    txn_id: str
    time_us: int
    located: bool
    values: tuple[Any, ...]  # in Retention.fields order

    def payload(self) -> str:
        return json.dumps(list(self.values), separators=(",", ":"), allow_nan=False)

    @staticmethod
    def from_payload(txn_id: str, time_us: int, located: bool, payload: str) -> StoredEvent:
        return StoredEvent(txn_id, time_us, located, () if payload == "[]" else tuple(json.loads(payload)))

    @staticmethod
    def many_from_payloads(items: Sequence[tuple[str, int, bool, str]]) -> list[StoredEvent]:
        """:meth:`from_payload` of many ``(txn_id, time_us, located, payload)``, with one JSON
        decode for all the payloads (a lookup reads a few dozen events: one call, not dozens)."""
        if not items:
            return []
        make = StoredEvent._make  # tuple.__new__ underneath: cheaper than calling the class per event
        if all(item[3] == "[]" for item in items):  # an entity kind that keeps no field (e.g. a merchant's counts)
            return [make((t, us, loc, ())) for t, us, loc, _ in items]
        values = json.loads("[" + ",".join(item[3] for item in items) + "]")
        return [make((t, us, loc, tuple(v))) for (t, us, loc, _), v in zip(items, values)]


class EventTimes(Sequence[StoredEvent]):
    """The events of a :attr:`Retention.times_only` state as two columns, ``txn_ids`` and
    ``times_us`` (sorted by time, then txn id): reading a busy merchant's hundreds of events makes
    no object per event. As a sequence it is the same :class:`StoredEvent` values (no fields, not
    located), made on demand, and it compares equal to a tuple of them."""

    __slots__ = ("txn_ids", "times_us")

    def __init__(self, txn_ids: Sequence[str], times_us: Sequence[int]) -> None:
        if len(txn_ids) != len(times_us):
            raise ValueError("txn_ids and times_us differ in length")
        self.txn_ids, self.times_us = txn_ids, times_us

    def __len__(self) -> int:
        return len(self.txn_ids)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - an index or a slice, as a tuple's
        if isinstance(i, slice):
            return tuple(StoredEvent(t, us, False, ()) for t, us in zip(self.txn_ids[i], self.times_us[i]))
        return StoredEvent(self.txn_ids[i], self.times_us[i], False, ())

    def __iter__(self) -> Iterator[StoredEvent]:
        return (StoredEvent(t, us, False, ()) for t, us in zip(self.txn_ids, self.times_us))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EventTimes):
            return list(self.txn_ids) == list(other.txn_ids) and list(self.times_us) == list(other.times_us)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"EventTimes({len(self)} events)"


class Label(NamedTuple):
    """A feed label of one transaction: fraud or not, known from ``time_us`` (UTC microseconds)."""

    txn_id: str
    is_fraud: bool
    time_us: int
    source: str = UNNAMED_SOURCE

    def supersedes(self, other: Label) -> bool:
        """The labels feed's rule: the later label time wins, then the larger source name."""
        return (self.time_us, self.source.encode()) > (other.time_us, other.source.encode())


def latest_labels(labels: Iterable[Label]) -> list[Label]:
    """One label per txn id by :meth:`Label.supersedes` (the first written wins a full tie)."""
    best: dict[str, Label] = {}
    for lab in labels:
        cur = best.get(lab.txn_id)
        if cur is None or lab.supersedes(cur):
            best[lab.txn_id] = lab
    return list(best.values())


def labels_from_table(table: pa.Table) -> list[Label]:
    """Labels from a table with ``txn_id``, ``is_fraud``, ``label_time`` (timestamp or int64 UTC
    microseconds) and optionally ``source`` (e.g. the labels feed as :func:`parse_labels` returns
    it); a row with a null in any of the first three is refused (parse the feed first: it turns
    such rows into dead letters)."""
    missing = [c for c in ("txn_id", "is_fraud", "label_time") if c not in table.column_names]
    if missing:
        raise ValueError(f"labels lack column(s) {', '.join(missing)} (a label has txn_id, is_fraud, label_time)")
    for name in ("txn_id", "is_fraud", "label_time"):
        if table.column(name).null_count:
            raise ValueError(f"labels have {table.column(name).null_count} null {name} value(s); parse the feed "
                             "first (finfeat.transforms.labels.parse_labels makes dead letters of them)")
    when = table.column("label_time")
    if pa.types.is_timestamp(when.type):
        when = when.cast(pa.timestamp("us", tz="UTC"))
    times = when.cast(pa.int64()).to_pylist()
    sources = (table.column("source").fill_null(UNNAMED_SOURCE).to_pylist() if "source" in table.column_names
               else [UNNAMED_SOURCE] * table.num_rows)
    return [Label(str(t), bool(f), int(w), str(src)) for t, f, w, src in
            zip(table.column("txn_id").to_pylist(), table.column("is_fraud").to_pylist(), times, sources)]


@dataclass(frozen=True)
class EntityUpdate:
    """Events to add to one entity's state.

    ``pruned_max_us``: the newest time of this entity's events that the writer dropped itself
    because the retention would drop them (materialization pre-filters), so that the state
    records them as pruned exactly as if they had been written and pruned in the store.
    """

    entity: str
    key: str
    events: tuple[StoredEvent, ...]
    pruned_max_us: int | None = None


@dataclass(frozen=True)
class EntityState:
    """One entity's stored state, events sorted by (time, txn_id)."""

    entity: str
    key: str
    as_of_us: int
    pruned_max_us: int | None
    events: Sequence[StoredEvent]  # a tuple, or EventTimes for a times-only kind
    #: label-aware kinds: the live feed label of each of its events that has one (txn id -> label)
    labels: Mapping[str, Label] = field(default_factory=dict)

    def exact_for(self, at_us: int, reach_us: int) -> bool:
        """Whether a candidate at ``at_us`` sees every event its features need in this state.

        Everything newer than ``as_of - reach`` is kept, as are the newest and the newest
        located event before that; dropped events are no newer than ``pruned_max_us``. So a
        candidate is exact when it is newer than ``as_of - reach`` (its previous events are
        then kept or are the anchors) and no dropped event lies inside its longest window.
        Always true for ``at_us >= as_of_us``, the normal case of a transaction scored now.
        """
        if at_us <= self.as_of_us - reach_us:
            return False
        return self.pruned_max_us is None or self.pruned_max_us <= at_us - reach_us

    def canonical(self) -> tuple[object, ...]:
        """A comparable form (tests compare states written in different orders): as-of, pruned
        max, the events sorted and, where the store holds feed labels of them, those labels."""
        base = (self.as_of_us, self.pruned_max_us, tuple(sorted(self.events)))
        if not self.labels:
            return base
        return (*base, tuple(sorted((lab.txn_id, lab.is_fraud, lab.time_us, lab.source)
                                    for lab in self.labels.values())))


@dataclass(frozen=True)
class MissingState:
    """The answer for a key with no servable state."""

    entity: str
    key: str
    expired_at_us: int | None = None  # set when the backend knows the key expired

    @property
    def reason(self) -> str:
        return "expired" if self.expired_at_us is not None else "not_found"

    def error(self) -> KeyNotFound:
        if self.expired_at_us is not None:
            return KeyExpired(self.entity, self.key, self.expired_at_us)
        return KeyNotFound(self.entity, self.key)


@dataclass
class WriteStats:
    updates: int = 0          # entity updates sent
    events: int = 0           # stored events sent (an event counts once per entity kind)
    batches: int = 0
    labels: int = 0           # label records sent


def prune(events: Iterable[StoredEvent], as_of_us: int, reach_us: int) -> tuple[list[StoredEvent], int | None]:
    """The retention rule on a list of events: (kept events sorted, newest dropped time or None).

    The backends apply the same rule inside the store (Lua in Redis, SQL in SQLite); this
    reference version is what tests and :func:`materialize` use.
    """
    ordered = sorted(events, key=lambda e: (e.time_us, e.txn_id.encode()))
    horizon = as_of_us - reach_us
    old = [e for e in ordered if e.time_us <= horizon]
    if len(old) <= 1:
        return ordered, None
    keep = {old[-1].txn_id}
    for e in reversed(old):
        if e.located:
            keep.add(e.txn_id)
            break
    dropped = [e for e in old if e.txn_id not in keep]
    kept = [e for e in ordered if e.time_us > horizon or e.txn_id in keep]
    return kept, max((e.time_us for e in dropped), default=None)


# ----------------------------------------------------------------------- events -> entity updates


def event_time_us(table: pa.Table) -> np.ndarray:
    col = table.column("event_time")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("us", tz="UTC"))
    return col.cast(pa.int64()).to_numpy()


def check_event_columns(table: pa.Table, retention: Mapping[str, Retention]) -> None:
    needed = {"txn_id", "event_time"}
    for r in retention.values():
        needed.add(r.key_column)
        needed.update(r.fields)
    missing = sorted(needed - set(table.column_names))
    if missing:
        hint = ""
        if set(missing) & set(_GEO_FIELDS):
            hint = (" (the Delta features table has no merchant coordinates: pass the canonical events, "
                    "e.g. the backfill's parsed input, not the feature rows)")
        raise ValueError(f"events lack column(s) {', '.join(missing)} that the online state needs{hint}")


def stored_events(table: pa.Table, retention: Retention, rows: np.ndarray | None = None) -> list[StoredEvent]:
    """The given rows of an event table as one entity kind's stored events, in row order."""
    if rows is not None:
        table = table.take(pa.array(rows, pa.int64()))
    ids = table.column("txn_id").to_pylist()
    times = event_time_us(table).tolist()
    cols = [table.column(f).to_pylist() for f in retention.fields]
    if retention.keeps_location:
        lat = table.column("merchant_lat").is_valid().to_numpy(zero_copy_only=False)
        lon = table.column("merchant_lon").is_valid().to_numpy(zero_copy_only=False)
        located = (lat & lon).tolist()
    else:
        located = [False] * len(ids)
    return [StoredEvent(i, t, loc, tuple(v)) for i, t, loc, *v in zip(ids, times, located, *cols)]


def updates_from_events(table: pa.Table, retention: Mapping[str, Retention]) -> list[EntityUpdate]:
    """One update per (entity kind, key) touched by the events, events in input order."""
    check_event_columns(table, retention)
    out: list[EntityUpdate] = []
    for entity, r in retention.items():
        keys = table.column(r.key_column).to_pylist()
        events = stored_events(table, r)
        grouped: dict[str, list[StoredEvent]] = {}
        for k, e in zip(keys, events):
            grouped.setdefault(k, []).append(e)
        out.extend(EntityUpdate(entity, k, tuple(v)) for k, v in grouped.items())
    return out


def _unlocated(update: EntityUpdate) -> EntityUpdate:
    """``update`` with no event located: "located" means having the coordinates the kind keeps,
    so an event of a kind that keeps none is never located (what :func:`stored_events` gives)."""
    return EntityUpdate(update.entity, update.key, tuple(e._replace(located=False) for e in update.events),
                        update.pruned_max_us)


# ----------------------------------------------------------------------------- the store class


class OnlineStore(ABC):
    """Per-entity event state for online lookups; one subclass per backend.

    Construct with the feature spec (or an explicit retention); a store refuses to mix
    state written under another retention (:class:`StoreSpecMismatch`).
    """

    backend: ClassVar[str]

    def __init__(self, spec: FeatureSpec | Mapping[str, Retention], *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.retention: dict[str, Retention] = (
            retention_for(spec) if isinstance(spec, FeatureSpec) else dict(spec))
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_us = int(ttl_s * 1_000_000)

    # -- writes -----------------------------------------------------------------------------

    def write(self, events: pa.Table | Sequence[TransactionEvent], *, now_us: int | None = None) -> WriteStats:
        """Add canonical events (a table of ``EVENT_SCHEMA`` or typed rows) to every entity's
        state, in one batch. Idempotent and order-independent; the streaming job's entry point."""
        if not isinstance(events, pa.Table):
            events = events_to_table(list(events))
        return self.write_updates(updates_from_events(events, self.retention), now_us=now_us)

    def write_updates(self, updates: Sequence[EntityUpdate], *, now_us: int | None = None) -> WriteStats:
        """Apply entity updates as one batch (one transaction / one pipelined MULTI)."""
        for u in updates:
            if u.entity not in self.retention:
                raise ValueError(f"entity kind {u.entity!r} is not in this store's spec "
                                 f"({', '.join(self.retention)})")
        updates = [u if self.retention[u.entity].keeps_location or not any(e.located for e in u.events)
                   else _unlocated(u) for u in updates if u.events]
        if not updates:
            return WriteStats()
        for u in updates:  # NUL separates fields in the Redis read path; no real id contains it
            if "\0" in u.key or any("\0" in e.txn_id for e in u.events):
                raise ValueError(f"{u.entity} {u.key!r}: ids must not contain NUL characters")
        now = wall_clock_us() if now_us is None else now_us
        self._apply(updates, expire_at_us=now + self.ttl_us, now_us=now)
        return WriteStats(updates=len(updates), events=sum(len(u.events) for u in updates), batches=1)

    @property
    def reads_labels(self) -> bool:
        """Whether any entity kind has label-aware features (otherwise labels are not kept)."""
        return any(r.labels for r in self.retention.values())

    @property
    def label_ttl_us(self) -> int:
        """How long a label record lives after its last write: the TTL, or the longest reach of a
        label-aware entity kind when that is longer (a label must outlive its event's windows)."""
        return max([self.ttl_us, *(r.reach_us for r in self.retention.values() if r.labels)])

    def write_labels(self, labels: pa.Table | Sequence[Label], *, now_us: int | None = None) -> WriteStats:
        """Add feed labels (a table as :func:`labels_from_table` takes, or :class:`Label` rows),
        in one batch: per txn id the latest label time wins (then the larger source), whatever
        the order of writes; idempotent. The label of a transaction not written yet waits for it.
        A store whose spec has no label-aware feature keeps nothing (returns zero labels)."""
        rows = labels_from_table(labels) if isinstance(labels, pa.Table) else list(labels)
        if not self.reads_labels or not rows:
            return WriteStats()
        for lab in rows:
            if not lab.txn_id or "\0" in lab.txn_id or "\0" in lab.source:
                raise ValueError(f"label txn id {lab.txn_id!r}: ids must be non-empty and hold no NUL characters")
        rows = latest_labels(rows)
        now = wall_clock_us() if now_us is None else now_us
        self._apply_labels(rows, expire_at_us=now + self.label_ttl_us, now_us=now)
        return WriteStats(batches=1, labels=len(rows))

    # -- reads ------------------------------------------------------------------------------

    def read_states(self, keys: Sequence[tuple[str, str]], *, now_us: int | None = None
                    ) -> list[EntityState | MissingState]:
        """The state of each ``(entity kind, key)``, in one round trip / read transaction."""
        for entity, _ in keys:
            if entity not in self.retention:
                raise ValueError(f"entity kind {entity!r} is not in this store's spec ({', '.join(self.retention)})")
        if not keys:
            return []
        now = wall_clock_us() if now_us is None else now_us
        return self._read(list(keys), now_us=now)

    def read_state(self, entity: str, key: str, *, now_us: int | None = None) -> EntityState:
        """One state, or :class:`KeyNotFound` / :class:`KeyExpired`."""
        got = self.read_states([(entity, key)], now_us=now_us)[0]
        if isinstance(got, MissingState):
            raise got.error()
        return got

    # -- backend ----------------------------------------------------------------------------

    @abstractmethod
    def _apply(self, updates: Sequence[EntityUpdate], *, expire_at_us: int, now_us: int) -> None:
        """Apply the updates atomically per entity; monotonic; prune; set the expiry."""

    @abstractmethod
    def _apply_labels(self, labels: Sequence[Label], *, expire_at_us: int, now_us: int) -> None:
        """Keep each label unless the stored one supersedes it (or is still live and equal);
        extend the expiry; one atomic batch."""

    @abstractmethod
    def _read(self, keys: list[tuple[str, str]], *, now_us: int) -> list[EntityState | MissingState]:
        """Read states consistently per entity."""

    @abstractmethod
    def snapshot(self, *, now_us: int | None = None) -> dict[tuple[str, str], EntityState]:
        """Every live state (for tests, debugging and small stores; scans the whole store)."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (never includes a password)."""

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_meta(self, stored: str | None) -> None:
        mine = retention_json(self.retention)
        if stored is not None and stored != mine:
            raise StoreSpecMismatch(
                f"online store {self.location} holds state for retention {stored}, but this feature spec needs "
                f"{mine}; materialize into a fresh store (another SQLite file or Redis namespace)")


@dataclass
class MaterializeStats:
    """What :func:`finfeat.jobs.online.materialize.materialize` did."""

    events_in: int = 0
    events_written: int = 0            # stored events sent to the store, all entity kinds together
    labels_written: int = 0            # feed label records sent (label-aware specs only)
    states: dict[str, int] = field(default_factory=dict)   # entity kind -> keys written
    batches: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events_in / self.seconds if self.seconds else float("inf")

    @property
    def writes_per_s(self) -> float:
        return self.events_written / self.seconds if self.seconds else float("inf")


#: How long a long-running writer (the stream jobs) keeps retrying a store it cannot reach before
#: it gives up and fails: a server restart or a stall under load is ridden out, a store that stays
#: away stops the job with the store's error.
WRITE_RETRY_S = 120.0


def write_retrying(store: OnlineStore, events: pa.Table, *, within_s: float = WRITE_RETRY_S) -> int:
    """``store.write(events)``, retried with jittered exponential backoff (0.2 s growing to 10 s) for
    up to ``within_s`` seconds while the store is unavailable (:class:`StoreUnavailable`:
    unreachable, or no answer within its socket timeout). Safe because writes are idempotent and
    order-independent: a batch applied before its answer was lost changes nothing when applied
    again. Any other error (a store of another spec, a refused write) raises at once, and so does
    the last :class:`StoreUnavailable`. Returns the number of attempts made."""
    import logging

    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

    log = logging.getLogger(__name__)

    def note(state) -> None:  # noqa: ANN001
        log.warning("online store write failed (attempt %d, %.1f s so far): %s; retrying",
                    state.attempt_number, state.seconds_since_start, state.outcome.exception())

    attempts = 0
    for attempt in Retrying(retry=retry_if_exception_type(StoreUnavailable), stop=stop_after_delay(within_s),
                            wait=wait_random_exponential(multiplier=0.2, max=10), reraise=True, before_sleep=note):
        with attempt:
            attempts += 1
            store.write(events)
    return attempts
