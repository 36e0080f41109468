"""Online store latency and materialization rate, SQLite vs Redis over loopback.

    python benchmarks/bench_online.py [--lookups 3000] [--batches 300] [--redis-url redis://127.0.0.1:6379/0]

1. Loads the demo output: the canonical events of the demo's input (``data/sparkov``, parsed
   with the sparkov mapping and the demo key, deduplicated: the events behind
   ``warehouse/features``), and checks them against ``--warehouse``'s features table if there
   is one.
2. Materializes them into a fresh SQLite file and into Redis (a ``redis-server`` it starts on
   127.0.0.1 with no persistence, unless ``--redis-url`` names one; it flushes nothing else,
   it writes to its own namespace and deletes it afterwards): events/s and state writes/s.
3. Times lookups of random (card, merchant) candidates within a day after the data: single
   lookups and batches of 100 (p50 / p99 / p99.9), and, to show where the time goes, the
   state read alone (the store round trip and decoding) and the feature engine alone.

Targets: single lookup p99 under 0.5 ms on SQLite, 0.8 ms on Redis. Nothing here is asserted; it prints.
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finfeat.jobs.cli import DEMO_TOKEN_KEY  # noqa: E402
from finfeat.jobs.online import Candidate, lookup, lookup_many, materialize  # noqa: E402
from finfeat.jobs.online.base import OnlineStore  # noqa: E402
from finfeat.jobs.online.lookup import _entity_arrays  # noqa: E402
from finfeat.transforms.features import calendar_values, compute_sorted_entity_features  # noqa: E402
from finfeat.jobs.online.local_redis import running_redis  # noqa: E402
from finfeat.jobs.online.redis_store import RedisOnlineStore  # noqa: E402
from finfeat.jobs.online.sqlite import SqliteOnlineStore  # noqa: E402
from finfeat.jobs.sources import parse_files  # noqa: E402
from finfeat.schemas.events import EVENT_SCHEMA  # noqa: E402
from finfeat.schemas.mapping import Mapping  # noqa: E402
from finfeat.transforms.dedup import deduplicate  # noqa: E402
from finfeat.transforms.parse import CardTokenizer  # noqa: E402
from finfeat.transforms.spec import FeatureSpec  # noqa: E402

DAY_US = 86_400_000_000


def demo_events() -> pa.Table:
    events, _ = parse_files([REPO / "data" / "sparkov"], Mapping.load("sparkov"), CardTokenizer(DEMO_TOKEN_KEY.encode()),
                            run_id="bench", keep_source=True)
    unique, _ = deduplicate(events, run_id="bench", recorded_at_us=0)
    return unique.select(EVENT_SCHEMA.names)


def check_against_warehouse(events: pa.Table, warehouse: Path) -> str:
    path = warehouse / "features"
    if not (path / "_delta_log").is_dir():
        return f"no demo Delta table at {path} (run `make demo` to compare); using the parsed events"
    from deltalake import DeltaTable

    ids = DeltaTable(str(path)).to_pyarrow_table(columns=["txn_id", "card_token"])
    same = set(zip(ids.column("txn_id").to_pylist(), ids.column("card_token").to_pylist())) == set(
        zip(events.column("txn_id").to_pylist(), events.column("card_token").to_pylist()))
    return f"demo Delta table {path}: {ids.num_rows:,} rows, {'same' if same else 'DIFFERENT'} txn ids and card tokens"


def pct(values_ns: list[int]) -> tuple[float, float, float]:
    a = np.asarray(values_ns, dtype=np.float64) / 1e3  # microseconds
    return tuple(float(np.percentile(a, q)) for q in (50, 99, 99.9))  # type: ignore[return-value]


def candidates(events: pa.Table, n: int, seed: int) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    cards = events.column("card_token").to_pylist()
    merchants = events.column("merchant_id").to_pylist()
    end = int(events.column("event_time").cast(pa.int64()).to_numpy().max())
    out = []
    for _ in range(n):
        i, j = int(rng.integers(len(cards))), int(rng.integers(len(cards)))
        out.append(Candidate(cards[i], merchants[j], int(rng.integers(100, 50_000)), end + int(rng.integers(1, DAY_US)),
                             "USD", float(rng.uniform(25, 48)), float(rng.uniform(-120, -70))))
    return out


def bench_store(name: str, store: OnlineStore, events: pa.Table, spec: FeatureSpec, args: argparse.Namespace
                ) -> dict[str, object]:
    stats = materialize(store, events, spec)
    singles = candidates(events, args.lookups + args.warmup, seed=1)
    for c in singles[:args.warmup]:
        lookup(store, spec, c)
    single_ns, read_ns = [], []
    for c in singles[args.warmup:]:
        t0 = time.perf_counter_ns()
        lookup(store, spec, c)
        single_ns.append(time.perf_counter_ns() - t0)
    engine_ns = []
    for c in singles[args.warmup:]:
        t0 = time.perf_counter_ns()
        states = store.read_states([("card", c.card_token), ("merchant", c.merchant_id)])
        read_ns.append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        for e, s in zip(("card", "merchant"), states):
            group, t, columns, positions = _entity_arrays(store.retention[e], [c], [s])
            compute_sorted_entity_features(group, t, columns, spec.for_entity(e), positions)
        calendar_values(np.array([c.at_us], dtype=np.int64))
        engine_ns.append(time.perf_counter_ns() - t0)
    batch_ns = []
    batch_cands = candidates(events, args.batches * 100, seed=2)
    lookup_many(store, spec, batch_cands[:100])
    for b in range(args.batches):
        chunk = batch_cands[b * 100:(b + 1) * 100]
        t0 = time.perf_counter_ns()
        lookup_many(store, spec, chunk)
        batch_ns.append(time.perf_counter_ns() - t0)
    return {"name": name, "stats": stats, "single": pct(single_ns), "read": pct(read_ns), "batch": pct(batch_ns),
            "engine": pct(engine_ns)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=3000, help="single lookups timed per backend")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--batches", type=int, default=300, help="batches of 100 timed per backend")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (namespace ffbench:*)")
    parser.add_argument("--warehouse", default=str(REPO / "warehouse"), help="demo warehouse to compare with")
    args = parser.parse_args()

    spec = FeatureSpec.default()
    t0 = time.perf_counter()
    events = demo_events()
    print(f"demo events: {events.num_rows:,} ({events.column('card_token').unique().__len__():,} cards, "
          f"{events.column('merchant_id').unique().__len__():,} merchants), parsed in {time.perf_counter() - t0:.1f} s")
    print(check_against_warehouse(events, Path(args.warehouse)))
    print(f"machine: {os.cpu_count()} cpus, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    work = Path(tempfile.mkdtemp(prefix="ffbench-"))
    rows = []
    try:
        with SqliteOnlineStore(work / "online.db", spec) as store:
            rows.append(bench_store("SQLite (file, WAL)", store, events, spec, args))
        with ExitStack() as stack:
            url = args.redis_url or stack.enter_context(running_redis(work / "redis")).url
            store = RedisOnlineStore(url, spec, namespace=f"ffbench:{os.getpid()}")
            try:
                rows.append(bench_store("Redis (127.0.0.1)", store, events, spec, args))
            finally:
                store.drop_namespace()
                store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'backend':<20}{'materialize':>14}{'state writes':>14}"
          f"{'lookup p50':>12}{'p99':>9}{'p99.9':>9}"
          f"{'x100 p50':>11}{'p99':>9}{'p99.9':>9}{'per cand':>10}"
          f"{'read p50':>10}{'p99':>8}{'engine p50':>12}{'p99':>8}")
    print(f"{'':<20}{'events/s':>14}{'/s':>14}{'us':>12}{'us':>9}{'us':>9}{'ms':>11}{'ms':>9}{'ms':>9}{'us':>10}"
          f"{'us':>10}{'us':>8}{'us':>12}{'us':>8}")
    for r in rows:
        s = r["stats"]
        sp, bp, rp, ep = r["single"], r["batch"], r["read"], r["engine"]
        print(f"{r['name']:<20}{s.events_per_s:>14,.0f}{s.writes_per_s:>14,.0f}"
              f"{sp[0]:>12,.0f}{sp[1]:>9,.0f}{sp[2]:>9,.0f}"
              f"{bp[0] / 1e3:>11.2f}{bp[1] / 1e3:>9.2f}{bp[2] / 1e3:>9.2f}{bp[0] / 100:>10,.0f}"
              f"{rp[0]:>10,.0f}{rp[1]:>8,.0f}{ep[0]:>12,.0f}{ep[1]:>8,.0f}")
    print()
    print("materialize: input events/s, and stored entity events/s (an event is stored once per entity kind, "
          "only those the state keeps)")
    print("lookup: one candidate end to end (state read + feature engine); x100: one lookup_many of 100 candidates;")
    print("read: the state read alone (card + merchant in one round trip / read transaction), no arithmetic;")
    print("engine: the lookup's arithmetic alone (card and merchant columns + features, calendar) on the states read, no store")
    for r in rows:
        limit = 500 if r["name"].startswith("SQLite") else 800
        met = r["single"][1] < limit
        print(f"target single-lookup p99 < {limit / 1e3:.1f} ms on {r['name']}: {'met' if met else 'NOT met'} "
              f"({r['single'][1] / 1e3:.2f} ms; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
