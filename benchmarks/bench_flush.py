"""Cost of one stream flush as the history grows: the entity step alone, no runner.

    python benchmarks/bench_flush.py [--rate 1000] [--minutes 10] [--tick-ms 1000] [--cards 50000]
                                     [--merchants 5000]

Synthetic events as ``bench_stream.py`` sends them (cards uniform, merchants Zipf(1.3): one
merchant carries about a quarter of the traffic), ``--rate`` per second of event time, released
every ``--tick-ms`` by ``flush_bucket`` into one bucket per entity kind (the stream job's default),
with the v1 spec. Printed per minute of events: the history held and the flush time of each
entity kind (median and max over that minute, milliseconds). Flat columns mean a flush costs
its own events, not the history held. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finfeat.schemas.events import EVENT_SCHEMA  # noqa: E402
from finfeat.transforms import stream_steps as steps  # noqa: E402
from finfeat.transforms.spec import FeatureSpec  # noqa: E402

T0 = 1_800_000_000_000_000


def events(rng: np.random.Generator, start_us: int, span_us: int, n: int, *, cards: int, merchants: int,
           prefix: str) -> pa.Table:
    merchant = np.minimum(rng.zipf(1.3, n) - 1, merchants - 1)
    card = rng.integers(0, cards, n)
    t = start_us + np.sort(rng.integers(0, span_us, n))
    cols = {
        "txn_id": pa.array([f"{prefix}{i:06d}" for i in range(n)]),
        "card_token": pa.array([f"tok_{c:032x}" for c in card]),
        "merchant_id": pa.array([f"m{m:05d}" for m in merchant]),
        "merchant_category": pa.array(["grocery_pos"] * n),
        "amount_minor": pa.array(np.maximum(1, rng.lognormal(7.5, 1.0, n)).astype(np.int64)),
        "currency": pa.array(["USD"] * n),
        "event_time": pa.array(t).cast(pa.timestamp("us", "UTC")),
        "channel": pa.array(["pos"] * n),
        "card_lat": pa.array(np.full(n, 40.0)), "card_lon": pa.array(np.full(n, -74.0)),
        "merchant_lat": pa.array(25 + (merchant % 97) * 0.2), "merchant_lon": pa.array(-120 + (merchant % 89) * 0.5),
        "is_fraud": pa.array(np.zeros(n, dtype=bool)),
    }
    return steps.as_events(pa.table({f.name: cols[f.name] for f in EVENT_SCHEMA}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000, help="events per second of event time")
    ap.add_argument("--minutes", type=int, default=10, help="minutes of event time")
    ap.add_argument("--tick-ms", type=int, default=1000, help="event time between flushes")
    ap.add_argument("--cards", type=int, default=50_000)
    ap.add_argument("--merchants", type=int, default=5_000)
    args = ap.parse_args()
    if min(args.rate, args.minutes, args.tick_ms, args.cards, args.merchants) <= 0:
        ap.error("every value must be positive")
    spec = FeatureSpec.default()
    rng = np.random.default_rng(11)
    tick_us = args.tick_ms * 1000
    per_tick = max(1, args.rate * args.tick_ms // 1000)
    ticks_per_minute = max(1, 60_000 // args.tick_ms)
    buckets = {e: [steps.EntityStep(spec, e, anchor=e == "card"), None, []] for e in spec.entities}
    print(f"flush cost, {args.rate:,} events/s of event time, a flush every {args.tick_ms} ms, "
          f"{args.cards:,} cards, {args.merchants:,} merchants (Zipf 1.3)")
    print(f"{'minute':>6} {'history rows':>13} " + " ".join(f"{e + ' p50 ms':>15} {e + ' max ms':>15}"
                                                           for e in buckets))
    for minute in range(args.minutes):
        for k in range(ticks_per_minute):
            tick = minute * ticks_per_minute + k
            batch = events(rng, T0 + tick * tick_us, tick_us, per_tick, cards=args.cards,
                           merchants=args.merchants, prefix=f"x{tick:07d}-")
            for step_history_times in buckets.values():
                step, history, times = step_history_times
                started = time.perf_counter()
                done = steps.flush_bucket(batch, history, T0 + (tick + 1) * tick_us - 1, step=step)
                times.append(time.perf_counter() - started)
                step_history_times[1] = done.history
        held = buckets["card"][1].num_rows
        cells = []
        for _, _, times in buckets.values():
            last = np.array(times[-ticks_per_minute:]) * 1e3
            cells += [f"{np.median(last):15.1f}", f"{last.max():15.1f}"]
        print(f"{minute + 1:6d} {held:13,d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
