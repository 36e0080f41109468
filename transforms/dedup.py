"""Repeated txn ids: keep one copy by a rule that picks the same winner in every run."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.transforms.parse import SOURCE, SOURCE_ROW, make_dead_letters

#: The winner is the first copy in this order: earliest event time, then the smallest
#: content, then the earliest position in the input. None of it depends on arrival order.
WINNER_ORDER = ["txn_id", "event_time", "card_token", "merchant_id", "amount_minor", "currency", SOURCE, SOURCE_ROW]


def deduplicate(events: pa.Table, *, run_id: str, recorded_at_us: int) -> tuple[pa.Table, pa.Table]:
    """``(unique_events, dead_letters)``: every txn id once, the other copies dead-lettered."""
    if events.num_rows == 0:
        return events, make_dead_letters(run_id=run_id, stage="dedup", reasons=[], details=[], source=[],
                                         source_rows=[], txn_ids=[], payloads=[], recorded_at_us=recorded_at_us)
    if pc.count_distinct(events.column("txn_id")).as_py() == events.num_rows:
        # no repeats (the usual case): nothing to choose, so no sort and no copy of the rows
        return events, make_dead_letters(run_id=run_id, stage="dedup", reasons=[], details=[], source=[],
                                         source_rows=[], txn_ids=[], payloads=[], recorded_at_us=recorded_at_us)
    ordered = events.take(pc.sort_indices(events, sort_keys=[(c, "ascending") for c in WINNER_ORDER]))
    ids = ordered.column("txn_id").combine_chunks()
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    first = np.ones(len(codes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    winners = ordered.filter(pa.array(first))
    losers_idx = np.flatnonzero(~first)
    if losers_idx.size == 0:
        return winners, make_dead_letters(run_id=run_id, stage="dedup", reasons=[], details=[], source=[],
                                          source_rows=[], txn_ids=[], payloads=[], recorded_at_us=recorded_at_us)
    winner_pos = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    losers = ordered.take(pa.array(losers_idx))
    kept = ordered.take(pa.array(winner_pos[losers_idx]))
    payloads = [json.dumps(r, default=str, sort_keys=True) for r in losers.select(EVENT_SCHEMA.names).to_pylist()]
    details = [f"txn id repeated; kept the copy from {s} record {r}"
               for s, r in zip(kept.column(SOURCE).to_pylist(), kept.column(SOURCE_ROW).to_pylist())]
    dead = make_dead_letters(
        run_id=run_id, stage="dedup", reasons=["duplicate_txn_id"] * len(losers_idx), details=details,
        source=losers.column(SOURCE).to_pylist(), source_rows=losers.column(SOURCE_ROW).to_pylist(),
        txn_ids=losers.column("txn_id").to_pylist(), payloads=payloads, recorded_at_us=recorded_at_us,
    )
    return winners, dead
