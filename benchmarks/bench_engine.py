"""Micro-benchmark of the two vectorized hot spots: the parser and the feature engine.

    python benchmarks/bench_engine.py --events 1000000 --repeat 5

1. ``parse_batch`` with the Sparkov mapping (a ``strptime`` time format, decimal amounts as
   text, card numbers tokenized) over N synthetic Sparkov-shaped rows, all valid.
2. ``compute_entity_features`` for the card entity of the v1 spec over N canonical events
   (20,000 cards, 60 days).

Prints the best and the median of ``--repeat`` runs of each, in seconds. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sparkov_rows(n: int, rng: np.random.Generator) -> pa.Table:
    t = rng.integers(1_546_300_800, 1_546_300_800 + 60 * 86_400, n)
    times = pc.strftime(pa.array(t, pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
    cards = rng.integers(4_000_000_000_000_000, 4_000_000_000_020_000, n)
    amounts = rng.integers(1, 500_000, n)
    cols = {
        "trans_date_trans_time": times,
        "cc_num": pa.array(cards.astype(str)),
        "merchant": pa.array(np.char.add("fraud_m", (rng.integers(0, 700, n)).astype(str))),
        "category": pa.array(rng.choice(["grocery_pos", "shopping_net", "travel", "misc_pos"], n)),
        "amt": pa.array([f"{a // 100}.{a % 100:02d}" for a in amounts.tolist()]),
        "lat": pa.array((rng.random(n) * 50).round(4).astype(str)),
        "long": pa.array((-rng.random(n) * 100).round(4).astype(str)),
        "trans_num": pa.array([f"{a:016x}{b:016x}" for a, b in zip(rng.integers(0, 2**64, n, dtype=np.uint64).tolist(),
                                                                   rng.integers(0, 2**64, n, dtype=np.uint64).tolist())]),
        "merch_lat": pa.array((rng.random(n) * 50).round(4).astype(str)),
        "merch_long": pa.array((-rng.random(n) * 100).round(4).astype(str)),
        "is_fraud": pa.array(rng.choice(["0", "1"], n, p=[0.99, 0.01])),
        "_source_row": pa.array(np.arange(n), pa.int64()),
    }
    return pa.table(cols)


def _events(n: int, rng: np.random.Generator) -> pa.Table:
    t = np.sort(rng.integers(1_700_000_000_000_000, 1_700_000_000_000_000 + 60 * 86_400_000_000, n))
    return pa.table({
        "txn_id": pa.array([f"t{i:012d}" for i in range(n)]),
        "card_token": pa.array(np.char.add("tok_", rng.integers(0, 20_000, n).astype(str))),
        "merchant_id": pa.array(np.char.add("m", rng.integers(0, 5_000, n).astype(str))),
        "amount_minor": pa.array(rng.lognormal(8, 1.5, n).astype(np.int64) + 1, pa.int64()),
        "event_time": pa.array(t, pa.timestamp("us", tz="UTC")),
        "merchant_lat": pa.array(rng.random(n) * 50),
        "merchant_lon": pa.array(-rng.random(n) * 100),
        "is_fraud": pa.array(rng.random(n) < 0.01),
    })


def _time(fn, repeat: int) -> tuple[float, float]:
    got = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        got.append(time.perf_counter() - t)
    return min(got), statistics.median(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.features import compute_entity_features
    from finfeat.transforms.parse import CardTokenizer, parse_batch
    from finfeat.transforms.spec import FeatureSpec

    rng = np.random.default_rng(args.seed)
    raw = _sparkov_rows(args.events, rng)
    mapping, tokenizer = Mapping.load("sparkov"), CardTokenizer(b"bench-key-0123456789")
    events, dead = parse_batch(raw, mapping=mapping, tokenizer=tokenizer, source="bench", run_id="bench",
                               recorded_at_us=0)
    assert dead.num_rows == 0, dead.column("reason").to_pylist()[:5]
    best, median = _time(lambda: parse_batch(raw, mapping=mapping, tokenizer=tokenizer, source="bench",
                                             run_id="bench", recorded_at_us=0), args.repeat)
    print(f"parse_batch (sparkov, {args.events:,} rows): best {best:.3f} s, median {median:.3f} s")

    spec = FeatureSpec.default()
    table = _events(args.events, rng)
    defs = spec.for_entity("card")
    best, median = _time(lambda: compute_entity_features(table, defs, "card"), args.repeat)
    print(f"compute_entity_features (card, {len(defs)} features, {args.events:,} events): "
          f"best {best:.3f} s, median {median:.3f} s")


if __name__ == "__main__":
    main()
