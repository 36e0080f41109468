"""Online lookup: stored history + the candidate -> the batch engine -> the candidate's row.

For a candidate transaction (card, merchant, amount, merchant location, time ``at``) the lookup
reads each entity's state, puts per entity kind that entity's retained events plus the
candidate in the engine's sort order, and runs the feature engine's arithmetic on them
(:func:`finfeat.transforms.features.compute_sorted_entity_features`, which feeds the same
per-feature code as the ``compute_entity_features`` that the backfill's ``ComputeFeatures`` and
the streaming job call, from numpy columns instead of an Arrow table: a lookup's few dozen rows
would otherwise spend most of their time in Arrow's per-call overhead), and
:func:`calendar_values` for the candidate. Windows therefore slide to ``at``, and the z-score,
new-merchant flag and velocity use the candidate's own amount, merchant and location: the
result is the row the backfill would write for that transaction, bit for bit.

For label-aware features each stored event goes in with its effective label: the store's feed
label (its ``is_fraud`` and ``label_time``) where it holds one, else the event's own ``is_fraud``
with no label time (known ``delay`` after the event), exactly the columns the backfill's
``attach_labels`` gives the engine; the engine's rule decides which labels were known before
the candidate.

Each entity kind gets its own table (card history + candidate; merchant history + candidate)
rather than one union table: with a union, card events at the candidate's merchant that the
merchant's own state does not hold (a merchant key that expired or is new) would count in the
merchant's windows. A batch of candidates is one engine call per entity kind: every
candidate's rows get a private group key, so candidates never see each other.

The candidate's ``txn_id`` decides ties: the engine's windows hold ``(time, txn_id) < (at,
candidate txn_id)``. Pass the real id when it exists; the default :data:`CANDIDATE_TXN_ID`
(``"\\uffff"``) sorts after every stored id that starts below U+FFFF (every hex, UUID or ASCII
id), i.e. "after everything already stored at that instant". A stored event with the
candidate's own txn id is left out of the history (re-scoring a written transaction gives its
own row).
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from finfeat.jobs.online.base import (
    CandidateBeforeState,
    EntityState,
    EventTimes,
    MissingState,
    OnlineStore,
    Retention,
    retention_for,
    wall_clock_us,
)
from finfeat.transforms.features import calendar_values, compute_sorted_entity_features
from finfeat.transforms.spec import FeatureDef, FeatureSpec

#: Default candidate id: sorts after any real id at the same instant (see the module docstring).
CANDIDATE_TXN_ID = "\uffff"

_FIELD_TYPES: dict[str, pa.DataType] = {
    "card_token": pa.string(), "merchant_id": pa.string(), "amount_minor": pa.int64(),
    "merchant_lat": pa.float64(), "merchant_lon": pa.float64(), "is_fraud": pa.bool_(),
}


@dataclass(frozen=True)
class Candidate:
    """A transaction to score. Money in integer minor units, time in UTC microseconds.

    ``merchant_lat`` / ``merchant_lon`` are the merchant's coordinates (what the batch
    ``geo_velocity`` reads); leave them None when unknown (velocity is then null, as in batch).
    """

    card_token: str
    merchant_id: str
    amount_minor: int
    at_us: int
    currency: str = ""
    merchant_lat: float | None = None
    merchant_lon: float | None = None
    txn_id: str = CANDIDATE_TXN_ID

    def value(self, column: str) -> Any:
        if column == "is_fraud":  # a transaction being scored has no label (and its own never counts for it)
            return None
        return getattr(self, column)


@dataclass(frozen=True)
class LookupResult:
    """The candidate's feature row, with the freshness of the state it was computed from.

    * ``features``: feature name -> value, exactly the batch row's (None where batch has null);
    * ``as_of_us``: the newest event time in the card's state (the spec's first entity kind);
      None when that state is missing and ``on_missing="empty"`` was asked for;
    * ``age_s``: ``(at - as_of) / 1e6``, how long before the candidate that state was last moved
      by an event (a card idle for a week shows a week; negative when the state already holds
      events after the candidate, which the lookup only allows while it is still exact);
    * ``entity_as_of_us``: the as-of time of every entity kind's state (None where missing);
    * ``missing``: entity kind -> ``"not_found"`` / ``"expired"`` for states that were absent and
      computed as empty history (only with ``on_missing="empty"``; empty otherwise).
    """

    features: dict[str, Any]
    as_of_us: int | None
    age_s: float | None
    at_us: int
    entity_as_of_us: dict[str, int | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


OnMissing = Literal["raise", "empty"]


@dataclass(frozen=True)
class _Plan:
    """What a lookup needs from a spec, derived once per spec (lookups are hot)."""

    retention: dict[str, Retention]
    entities: tuple[str, ...]
    defs: dict[str, tuple[FeatureDef, ...]]   # entity kind -> its features; "event" -> calendar
    names: tuple[str, ...]


_PLANS: dict[str, _Plan] = {}


def _plan(spec: FeatureSpec) -> _Plan:
    got = _PLANS.get(spec.spec_hash)
    if got is None:
        entities = tuple(spec.entities)
        got = _PLANS[spec.spec_hash] = _Plan(
            retention=retention_for(spec), entities=entities,
            defs={e: spec.for_entity(e) for e in (*entities, "event")}, names=tuple(spec.names))
    return got


def _entity_key(c: Candidate, r: Retention) -> str:
    return c.value(r.key_column)


def lookup(store: OnlineStore, spec: FeatureSpec, candidate: Candidate, *, on_missing: OnMissing = "raise",
           now_us: int | None = None) -> LookupResult:
    """The feature row for one candidate.

    Raises :class:`KeyNotFound` (:class:`KeyExpired`) when an entity has no servable state
    (unless ``on_missing="empty"``), :class:`CandidateBeforeState` when the state no longer
    covers the candidate's time, :class:`StoreUnavailable` when the store cannot be reached.
    """
    return lookup_many(store, spec, [candidate], on_missing=on_missing, now_us=now_us)[0]


def lookup_many(store: OnlineStore, spec: FeatureSpec, candidates: Sequence[Candidate], *,
                on_missing: OnMissing = "raise", now_us: int | None = None) -> list[LookupResult]:
    """Feature rows for many candidates: one store round trip, one engine call per entity kind.

    Each candidate is computed against the stored state only, never against the other
    candidates of the batch. Errors as :func:`lookup` (the first problem raises).
    """
    if on_missing not in ("raise", "empty"):
        raise ValueError("on_missing must be 'raise' or 'empty'")
    retention = store.retention
    plan = _plan(spec)
    if plan.retention != retention:
        raise ValueError(f"the store was opened for another feature spec (it keeps {retention}); "
                         f"open it with the spec you look up with")
    if not candidates:
        return []
    now = wall_clock_us() if now_us is None else now_us
    entities = plan.entities
    keys = [(e, _entity_key(c, retention[e])) for c in candidates for e in entities]
    states = store.read_states(keys, now_us=now)
    per: list[dict[str, EntityState | MissingState]] = []
    for i, c in enumerate(candidates):
        got = dict(zip(entities, states[i * len(entities):(i + 1) * len(entities)]))
        for e, s in got.items():
            if isinstance(s, MissingState):
                if on_missing == "raise":
                    raise s.error()
            elif not s.exact_for(c.at_us, retention[e].reach_us):
                raise CandidateBeforeState(e, s.key, c.at_us, s.as_of_us, s.pruned_max_us)
        per.append(got)

    rows: list[dict[str, Any]] = [{} for _ in candidates]
    for e in entities:
        group, t, columns, positions = _entity_arrays(retention[e], candidates, [p[e] for p in per])
        computed = compute_sorted_entity_features(group, t, columns, plan.defs[e], positions)
        _scatter(rows, computed, plan.defs[e])
    calendar_defs = plan.defs["event"]
    if calendar_defs:
        values = calendar_values(np.fromiter((c.at_us for c in candidates), np.int64, len(candidates)))
        everywhere = np.ones(len(candidates), dtype=bool)
        _scatter(rows, {f.name: (values[f.agg], everywhere) for f in calendar_defs}, calendar_defs)

    anchor = entities[0] if entities else None
    out = []
    for i, c in enumerate(candidates):
        as_ofs = {e: (s.as_of_us if isinstance(s, EntityState) else None) for e, s in per[i].items()}
        missing = {e: s.reason for e, s in per[i].items() if isinstance(s, MissingState)}
        as_of = as_ofs.get(anchor) if anchor else None
        out.append(LookupResult(
            features={name: rows[i][name] for name in plan.names},
            as_of_us=as_of, age_s=None if as_of is None else (c.at_us - as_of) / 1e6, at_us=c.at_us,
            entity_as_of_us=as_ofs, missing=missing))
    return out


@functools.lru_cache(maxsize=None)
def _python(typ: pa.DataType) -> type:
    if pa.types.is_boolean(typ):
        return bool
    if pa.types.is_integer(typ):
        return int
    if pa.types.is_floating(typ):
        return float
    raise TypeError(f"no Python scalar for feature type {typ}")


def _scatter(rows: list[dict[str, Any]], computed: dict[str, tuple[np.ndarray, np.ndarray]],
             defs: Sequence[FeatureDef]) -> None:
    """Computed (values, validity) per feature -> each candidate's row, as the Python values
    the feature's Arrow type gives (None where the batch row has null)."""
    for f in defs:
        values, valid = computed[f.name]
        cast = _python(f.arrow_type)
        for row, v, ok in zip(rows, values.tolist(), valid.tolist()):
            row[f.name] = cast(v) if ok else None


def _entity_arrays(r: Retention, candidates: Sequence[Candidate], states: Sequence[EntityState | MissingState]
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]], np.ndarray]:
    """Numpy columns of one entity kind's lookup rows, in the engine's order, and each
    candidate's row.

    Candidate i's rows (its retained history and itself, sorted by (time, txn id bytes)) form
    group i, so the engine keeps every candidate's windows apart. Text fields become integer
    codes, as the engine compares them only for equality.
    """
    times: list[int] = []
    group: list[int] = []
    values: list[list[Any]] = [[] for _ in r.fields]
    positions: list[int] = []
    label_times: list[int | None] = []
    fraud_at = r.fields.index("is_fraud") if r.labels else -1
    for i, (c, s) in enumerate(zip(candidates, states)):
        own = tuple(c.value(name) for name in r.fields)
        base = len(times)
        if not isinstance(s, EntityState):
            times.append(c.at_us)
            for col, v in zip(values, own):
                col.append(v)
            label_times.append(None)
            positions.append(base)
            group.append(i)
            continue
        # the stored events are sorted by (time, txn id bytes): the candidate goes in at k
        if isinstance(s.events, EventTimes):  # ids and times only (nothing else to line up)
            ids, ts = s.events.txn_ids, s.events.times_us
            if c.txn_id in ids:
                drop = ids.index(c.txn_id)
                ids, ts = [*ids[:drop], *ids[drop + 1:]], [*ts[:drop], *ts[drop + 1:]]
            events: Sequence[Any] = ids
        else:
            events = [ev for ev in s.events if ev.txn_id != c.txn_id]
            ids, ts = None, [ev.time_us for ev in events]
        k = bisect.bisect_left(ts, c.at_us)
        tied = bisect.bisect_right(ts, c.at_us, lo=k)
        if tied > k:
            own_id = c.txn_id.encode()
            tied_ids = ids[k:tied] if ids is not None else [ev.txn_id for ev in events[k:tied]]
            k += sum(1 for t in tied_ids if t.encode() < own_id)
        times += ts[:k]
        times.append(c.at_us)
        times += ts[k:]
        for j, col in enumerate(values):
            got = [ev.values[j] for ev in events]
            if j == fraud_at and s.labels:  # a feed label overrides the event's own
                got = [lab.is_fraud if (lab := s.labels.get(ev.txn_id)) is not None else v
                       for ev, v in zip(events, got)]
            col += got[:k]
            col.append(own[j])
            col += got[k:]
        if r.labels:
            lt = [lab.time_us if (lab := s.labels.get(ev.txn_id)) is not None else None for ev in events]
            label_times += lt[:k]
            label_times.append(None)
            label_times += lt[k:]
        positions.append(base + k)
        group.extend([i] * (len(events) + 1))
    columns: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, col in zip(r.fields, values):
        typ = _FIELD_TYPES.get(name)
        if typ == pa.string():
            codes: dict[Any, int] = {}
            columns[name] = (np.array([codes.setdefault(v, len(codes)) for v in col], dtype=np.int64), None)
        elif typ == pa.float64():
            valid = np.array([v is not None for v in col], dtype=bool)
            columns[name] = (np.array([0.0 if v is None else v for v in col], dtype=np.float64), valid)
        elif typ == pa.bool_():
            valid = np.array([v is not None for v in col], dtype=bool)
            columns[name] = (np.array([bool(v) for v in col], dtype=bool), valid)
        else:
            columns[name] = (np.array(col, dtype=np.int64), None)
    if r.labels:
        valid = np.array([v is not None for v in label_times], dtype=bool)
        columns["label_time"] = (np.array([0 if v is None else v for v in label_times], dtype=np.int64), valid)
    return (np.array(group, dtype=np.int64), np.array(times, dtype=np.int64), columns,
            np.array(positions, dtype=np.int64))
