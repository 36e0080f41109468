"""Online lookup: stored history + the candidate -> the batch engine -> the candidate's row.

For a candidate transaction (card, merchant, amount, merchant location, time ``at``) the lookup
reads each entity's state, builds per entity kind a small table of that entity's retained
events plus the candidate, and calls :func:`finfeat.transforms.features.compute_entity_features`
(and :func:`compute_calendar_features` for the candidate) -- the functions the backfill's
``ComputeFeatures`` and the streaming job call. Windows therefore slide to ``at``, and the
z-score, new-merchant flag and velocity use the candidate's own amount, merchant and location:
the result is the row the backfill would write for that transaction, bit for bit.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from finfeat.jobs.online.base import (
    CandidateBeforeState,
    EntityState,
    MissingState,
    OnlineStore,
    Retention,
    retention_for,
    wall_clock_us,
)
from finfeat.schemas.events import EVENT_TIME_TYPE
from finfeat.transforms.features import compute_calendar_features, compute_entity_features
from finfeat.transforms.spec import FeatureSpec

#: Default candidate id: sorts after any real id at the same instant (see the module docstring).
CANDIDATE_TXN_ID = "\uffff"

_FIELD_TYPES: dict[str, pa.DataType] = {
    "card_token": pa.string(), "merchant_id": pa.string(), "amount_minor": pa.int64(),
    "merchant_lat": pa.float64(), "merchant_lon": pa.float64(),
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


_RETENTION_BY_SPEC: dict[str, dict[str, Retention]] = {}


def _retention(spec: FeatureSpec) -> dict[str, Retention]:
    got = _RETENTION_BY_SPEC.get(spec.spec_hash)
    if got is None:
        got = _RETENTION_BY_SPEC[spec.spec_hash] = retention_for(spec)
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
    if _retention(spec) != retention:
        raise ValueError(f"the store was opened for another feature spec (it keeps {retention}); "
                         f"open it with the spec you look up with")
    if not candidates:
        return []
    now = wall_clock_us() if now_us is None else now_us
    entities = list(spec.entities)
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
        cols, positions = _entity_table(retention[e], candidates, [p[e] for p in per])
        computed = compute_entity_features(pa.table(cols), spec.for_entity(e), e)
        if computed:
            picked = pa.table(computed).take(pa.array(positions, pa.int64())).to_pylist()
            for row, got in zip(rows, picked):
                row.update(got)
    at = pa.table({"event_time": pa.array([c.at_us for c in candidates], pa.int64()).cast(EVENT_TIME_TYPE)})
    calendar = compute_calendar_features(at, spec.for_entity("event"))
    if calendar:
        for row, got in zip(rows, pa.table(calendar).to_pylist()):
            row.update(got)

    anchor = entities[0] if entities else None
    out = []
    for i, c in enumerate(candidates):
        as_ofs = {e: (s.as_of_us if isinstance(s, EntityState) else None) for e, s in per[i].items()}
        missing = {e: s.reason for e, s in per[i].items() if isinstance(s, MissingState)}
        as_of = as_ofs.get(anchor) if anchor else None
        out.append(LookupResult(
            features={name: rows[i][name] for name in spec.names},
            as_of_us=as_of, age_s=None if as_of is None else (c.at_us - as_of) / 1e6, at_us=c.at_us,
            entity_as_of_us=as_ofs, missing=missing))
    return out


def _entity_table(r: Retention, candidates: Sequence[Candidate], states: Sequence[EntityState | MissingState]
                  ) -> tuple[dict[str, pa.Array], list[int]]:
    """Columns of one entity kind's lookup table and the row of each candidate in it.

    Candidate i's rows (its retained history, then itself) share the group key ``str(i)`` in
    the entity's own column, so the engine keeps every candidate's windows apart.
    """
    txn: list[str] = []
    times: list[int] = []
    group: list[str] = []
    values: list[list[Any]] = [[] for _ in r.fields]
    positions: list[int] = []
    for i, (c, s) in enumerate(zip(candidates, states)):
        g = str(i)
        if isinstance(s, EntityState):
            for ev in s.events:
                if ev.txn_id == c.txn_id:
                    continue
                txn.append(ev.txn_id)
                times.append(ev.time_us)
                group.append(g)
                for col, v in zip(values, ev.values):
                    col.append(v)
        positions.append(len(txn))
        txn.append(c.txn_id)
        times.append(c.at_us)
        group.append(g)
        for col, name in zip(values, r.fields):
            col.append(c.value(name))
    cols: dict[str, pa.Array] = {
        "txn_id": pa.array(txn, pa.string()),
        "event_time": pa.array(times, pa.int64()).cast(EVENT_TIME_TYPE),
        r.key_column: pa.array(group, pa.string()),
    }
    for name, col in zip(r.fields, values):
        cols[name] = pa.array(col, _FIELD_TYPES.get(name))
    return cols, positions
