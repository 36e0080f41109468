"""Training time and test metrics on the Sparkov data and on generated data; online lookup+score latency.

    python benchmarks/bench_train.py [--events 1000000] [--skip-generated] [--skip-sparkov]

1. Sparkov: backfills ``data/sparkov`` (mapping ``sparkov``, 2019-01-01..2020-12-31, Beam's
   ``FnApiRunner``), then ``finfeat train`` with training period 2019-01-01..2019-01-15 and test
   period 2020-06-21..2020-06-22 (the two slices the bundled files hold).
2. Generated: ``finfeat.jobs.generate.generate`` (seed 7, ``--events``, 60 days from 2024-01-01;
   cached under the work folder), backfilled with mapping ``generated``; training period days
   1-38, a 7-day gap, test period days 46-60.
3. If the online store (``finfeat.jobs.online``) is installed: a SQLite store and a Redis store
   (a ``redis-server`` started on 127.0.0.1, when one is on PATH) materialized with the canonical
   events before the test period, then ``--latency-samples`` test transactions scored one at a
   time through ``finfeat.jobs.score.score_request`` (lookup + score) with the store and the
   model opened once, as a serving process holds them: p50/p95/p99.

Prints one table per part. Timings are wall clock on this machine (nothing is asserted).
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
import json
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKEN_KEY = b"bench-train-key-0123456789"


def _backfill(inputs: list[Path], mapping: str, warehouse: Path, start: date, end: date) -> dict:
    from finfeat.jobs.backfill import BackfillConfig, run_backfill
    from finfeat.jobs.sources import expand_inputs
    from finfeat.schemas.mapping import Mapping

    shutil.rmtree(warehouse, ignore_errors=True)
    return run_backfill(BackfillConfig(inputs=expand_inputs([str(p) for p in inputs]), mapping=Mapping.load(mapping),
                                       warehouse=warehouse, start=start, end=end, token_key=TOKEN_KEY,
                                       beam_args=["--runner=FnApiRunner"]))


def _train(warehouse: Path, out: Path, *, train: tuple[date, date], test: tuple[date, date], args: argparse.Namespace
           ) -> tuple[dict, dict, float]:
    from finfeat.jobs.train import TrainConfig, train as run_train

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    info = run_train(TrainConfig(warehouse=str(warehouse), train_start=train[0], train_end=train[1],
                                 test_start=test[0], test_end=test[1], seed=args.seed, threads=args.threads,
                                 n_estimators=args.n_estimators), out)
    wall = time.perf_counter() - t
    return info, json.loads((out / "metrics.json").read_text()), wall


def _canonical_events(inputs: list[Path], mapping_name: str):  # noqa: ANN202
    from finfeat.jobs.sources import parse_files
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer

    return parse_files(inputs, Mapping.load(mapping_name), CardTokenizer(TOKEN_KEY), run_id="bench")[0]


def _latency(name: str, inputs: list[Path], mapping: str, model: Path, test_start: date, work: Path,
             samples: int, seed: int) -> list[dict]:
    try:
        from finfeat.jobs.online import materialize, open_store
    except ImportError:
        print(f"[{name}] finfeat.jobs.online is absent: lookup+score latency skipped", file=sys.stderr)
        return []
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from finfeat.jobs.online.local_redis import running_redis
    from finfeat.jobs.score import Scorer, score_request
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.default()
    events = _canonical_events(inputs, mapping)
    t0 = pa.scalar(test_start, pa.date32()).cast(pa.timestamp("us", tz="UTC"))
    before = events.filter(pc.less(events.column("event_time"), t0))
    after = events.filter(pc.greater_equal(events.column("event_time"), t0)).sort_by("event_time")
    scorer = Scorer.load(model)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(after.num_rows, size=min(samples, after.num_rows), replace=False).tolist())
    requests = [{"card_token": r["card_token"], "merchant_id": r["merchant_id"], "amount_minor": r["amount_minor"],
                 "at_us": int(pa.scalar(r["event_time"], pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py()),
                 "merchant_lat": r["merchant_lat"], "merchant_lon": r["merchant_lon"]}
                for r in after.take(pa.array(picks)).to_pylist()]
    db = work / f"{name}_online.db"
    db.unlink(missing_ok=True)
    backends = [("SQLite", f"sqlite:{db}", None)]
    out = []
    with ExitStack() as stack:
        if shutil.which("redis-server"):
            backends.append(("Redis", stack.enter_context(running_redis(work / "redis")).url,
                             f"ffbench-score:{os.getpid()}"))
        else:
            print(f"[{name}] redis-server is not on PATH: Redis latency skipped", file=sys.stderr)
        for backend, url, namespace in backends:
            t = time.perf_counter()
            with open_store(url, spec, namespace=namespace) as store:
                materialize(store, before, spec)
                mat_s = time.perf_counter() - t
                for req in requests[: max(1, len(requests) // 10)]:  # warm up
                    score_request(scorer, req, store=store, allow_missing=True, spec=spec, reasons=0)
                times = []
                for req in requests:
                    t = time.perf_counter_ns()
                    score_request(scorer, req, store=store, allow_missing=True, spec=spec, reasons=0)
                    times.append((time.perf_counter_ns() - t) / 1e6)
            a = np.array(times)
            out.append({"dataset": name, "backend": backend, "store_events": before.num_rows, "materialize_s": mat_s,
                        "n": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                        "p99_ms": float(np.percentile(a, 99))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="generated events (default 1,000,000)")
    ap.add_argument("--work", default=str(REPO / "out" / "bench_train"), help="scratch folder (cached inputs)")
    ap.add_argument("--skip-sparkov", action="store_true")
    ap.add_argument("--skip-generated", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--latency-samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-estimators", type=int, default=300)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results, latencies = [], []

    if not args.skip_sparkov:
        sparkov = [REPO / "data" / "sparkov"]
        wh = work / "sparkov_wh"
        rep = _backfill(sparkov, "sparkov", wh, date(2019, 1, 1), date(2020, 12, 31))
        test = (date(2020, 6, 21), date(2020, 6, 22))
        info, metrics, wall = _train(wh, work / "sparkov_model", train=(date(2019, 1, 1), date(2019, 1, 15)),
                                     test=test, args=args)
        results.append(("sparkov", rep, info, metrics, wall))
        if not args.skip_latency:
            latencies += _latency("sparkov", sparkov, "sparkov", work / "sparkov_model", test[0], work,
                                  args.latency_samples, args.seed)

    if not args.skip_generated:
        from finfeat.jobs.generate import generate

        raw = work / f"generated_{args.events}.parquet"
        if not raw.exists():
            print(f"generating {args.events:,} events -> {raw}", file=sys.stderr)
            generate(out=raw, events=args.events, seed=args.seed, progress=False)
        start = date(2024, 1, 1)
        wh = work / "generated_wh"
        rep = _backfill([raw], "generated", wh, start, start + timedelta(days=59))
        test = (start + timedelta(days=45), start + timedelta(days=59))
        info, metrics, wall = _train(wh, work / "generated_model", train=(start, start + timedelta(days=37)),
                                     test=test, args=args)
        results.append((f"generated {args.events:,}", rep, info, metrics, wall))
        if not args.skip_latency:
            latencies += _latency("generated", [raw], "generated", work / "generated_model", test[0], work,
                                  args.latency_samples, args.seed)

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print()
    print(f"{'dataset':<20}{'backfill s':>11}{'train rows':>12}{'fraud':>7}{'test rows':>11}{'fraud':>7}"
          f"{'sets s':>8}{'xgb fit s':>10}{'LR fit s':>9}{'total s':>9}   model   {'ROC AUC':>8}{'AP':>8}{'cP@100':>8}")
    for name, rep, info, m, wall in results:
        sec = info["seconds"]
        for i, (model, key) in enumerate((("xgboost", "xgboost"), ("logreg", "logistic_regression"))):
            r = m[key]
            head = (f"{name:<20}{rep['seconds']:>11.1f}{info['train_rows']:>12,}{info['train_fraud']:>7,}"
                    f"{m['test_rows']:>11,}{m['test_fraud']:>7,}{sec['training_sets']:>8.1f}{sec['xgboost_fit']:>10.1f}"
                    f"{sec['logreg_fit']:>9.1f}{wall:>9.1f}") if i == 0 else " " * 104
            print(f"{head}   {model:<7} {f(r['roc_auc']):>8}{f(r['average_precision']):>8}"
                  f"{f(r['card_precision_at_' + str(m['k'])]):>8}")
    if latencies:
        print()
        print(f"{'online lookup+score':<20}{'backend':<9}{'store events':>14}{'materialize s':>15}{'n':>6}{'p50 ms':>9}"
              f"{'p95 ms':>9}{'p99 ms':>9}  target p99 < 2 ms")
        for lat in latencies:
            print(f"{lat['dataset']:<20}{lat['backend']:<9}{lat['store_events']:>14,}{lat['materialize_s']:>15.1f}"
                  f"{lat['n']:>6}{lat['p50_ms']:>9.2f}{lat['p95_ms']:>9.2f}{lat['p99_ms']:>9.2f}  "
                  f"{'met' if lat['p99_ms'] < 2 else 'NOT met'}")
    print(f"\n(threads {args.threads}, {args.n_estimators} trees, seed {args.seed}; models and reports in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
