"""Materialize the latest online state of every card and merchant from canonical events.

The backfill calls :func:`materialize` with its canonical events (history included) after its
Delta commit; anyone can call it with a table of ``EVENT_SCHEMA`` events. Only the events the
final state keeps are sent (per entity kind: everything within ``reach`` of the entity's
newest event, plus the newest and the newest located event before that), since the store's
retention would drop the rest anyway; writes are idempotent and monotonic, so materializing
the same or older events again, or racing the streaming writer, never moves a state back.

For a spec with label-aware features, feed labels are written too: those attached to the
events (a ``label_time`` column, as the backfill's events carry after ``attach_labels``) of the
events kept, and any ``labels`` table given.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.jobs.online.base import (
    EntityUpdate,
    Label,
    MaterializeStats,
    OnlineStore,
    Retention,
    check_event_columns,
    event_time_us,
    labels_from_table,
    stored_events,
)
from finfeat.transforms.spec import FeatureSpec

DEFAULT_BATCH_EVENTS = 5_000


_NONE = np.iinfo(np.int64).min


def retained_rows(table: pa.Table, retention: Retention) -> tuple[np.ndarray, np.ndarray]:
    """The rows one entity kind's final state keeps, sorted by (entity, time, txn_id), and for
    each of them the newest event time its entity drops (``_NONE`` when it drops nothing)."""
    n = table.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = pc.sort_indices(table, sort_keys=[(retention.key_column, "ascending"), ("event_time", "ascending"),
                                              ("txn_id", "ascending")]).to_numpy()
    keys = table.column(retention.key_column).take(order)
    codes = pc.dictionary_encode(keys).combine_chunks().indices.to_numpy(zero_copy_only=False)
    t = event_time_us(table)[order]
    last = np.ones(n, dtype=bool)            # last row of its entity
    last[:-1] = codes[1:] != codes[:-1]
    group_end = np.flatnonzero(last)
    gid = np.cumsum(np.r_[False, last[:-1]])  # dense group number per row
    horizon = t[group_end][gid] - retention.reach_us
    old = t <= horizon                        # a prefix of each group
    keep = ~old
    nxt_old = np.zeros(n, dtype=bool)
    nxt_old[:-1] = old[1:] & ~last[:-1]
    keep |= old & ~nxt_old                    # the newest old row of each group: the anchor
    if retention.keeps_location:
        lat = table.column("merchant_lat").take(order).is_valid().to_numpy(zero_copy_only=False)
        lon = table.column("merchant_lon").take(order).is_valid().to_numpy(zero_copy_only=False)
        cand = np.flatnonzero(old & lat & lon)
        if cand.size:
            g = gid[cand]
            newest = np.ones(cand.size, dtype=bool)
            newest[:-1] = g[1:] != g[:-1]
            keep[cand[newest]] = True         # the newest located old row of each group
    dropped_max = np.full(int(gid[-1]) + 1, _NONE, dtype=np.int64)
    np.maximum.at(dropped_max, gid[~keep], t[~keep])
    return order[keep], dropped_max[gid[keep]]


def materialize(store: OnlineStore, events: pa.Table, spec: FeatureSpec, *, labels: pa.Table | None = None,
                now_us: int | None = None, batch_events: int = DEFAULT_BATCH_EVENTS,
                progress: Callable[[MaterializeStats], None] | None = None) -> MaterializeStats:
    """Write the latest state per entity of ``events`` into ``store``; returns what it did.

    ``events``: canonical events (``EVENT_SCHEMA``; at least txn id, event time, card token,
    merchant id, amount and merchant coordinates). The Delta features table lacks the
    coordinates, so it is refused with a message rather than silently nulling geo velocity.
    ``now_us``: the clock the TTL counts from (default: now). ``progress`` is called after
    every batch with the running stats. A :class:`StoreUnavailable` mid-run leaves every entity
    state consistent (whole batches applied or not); re-run to finish, it is idempotent.
    ``labels``: feed labels (``txn_id``, ``is_fraud``, ``label_time``, optional ``source``) to
    write as well; kept only by a store whose spec has label-aware features.
    """
    if set(store.retention) != set(spec.entities):
        raise ValueError(f"the store keeps {sorted(store.retention)} but the spec has entities "
                         f"{sorted(spec.entities)}")
    check_event_columns(events, store.retention)
    started = time.perf_counter()
    stats = MaterializeStats(events_in=events.num_rows)
    pending: list[EntityUpdate] = []
    pending_events = 0

    def flush() -> None:
        nonlocal pending, pending_events
        if pending:
            store.write_updates(pending, now_us=now_us)
            stats.batches += 1
            stats.events_written += pending_events
            stats.seconds = time.perf_counter() - started
            pending, pending_events = [], 0
            if progress is not None:
                progress(stats)

    attached: list[Label] = []
    for entity, r in store.retention.items():
        rows, dropped_max = retained_rows(events, r)
        if rows.size == 0:
            continue
        kept = events.take(pa.array(rows, pa.int64()))
        if r.labels and "label_time" in kept.column_names:
            from_feed = kept.filter(pc.is_valid(kept.column("label_time")))
            attached += labels_from_table(from_feed.select(["txn_id", "is_fraud", "label_time"]))
        keys = kept.column(r.key_column).to_pylist()
        stored = stored_events(kept, r)
        stats.states[entity] = 0
        start = 0
        for end in range(1, len(keys) + 1):
            if end < len(keys) and keys[end] == keys[start]:
                continue
            # one entity's rows [start, end), split if it alone exceeds a batch
            pruned = int(dropped_max[start])
            for a in range(start, end, batch_events):
                b = min(end, a + batch_events)
                pending.append(EntityUpdate(entity, keys[start], tuple(stored[a:b]),
                                            pruned_max_us=None if pruned == _NONE else pruned))
                pending_events += b - a
                if pending_events >= batch_events:
                    flush()
            stats.states[entity] += 1
            start = end
    flush()
    if store.reads_labels:
        feed = attached + (labels_from_table(labels) if labels is not None and labels.num_rows else [])
        for a in range(0, len(feed), batch_events):
            stats.labels_written += store.write_labels(feed[a:a + batch_events], now_us=now_us).labels
            stats.batches += 1
    stats.seconds = time.perf_counter() - started
    return stats
