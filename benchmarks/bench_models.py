"""Model quality on generated data (tuned vs defaults vs the logistic baseline) and the online
lookup + score + reasons (+ audit) latency.

    python benchmarks/bench_models.py [--events 200000] [--skip-latency] [--tune-candidates 8]

1. ``finfeat.jobs.generate.generate`` (seed 7, ``--events``, 60 days from 2024-01-01: it plants
   compromised-card and compromised-merchant patterns), backfilled with mapping ``generated``
   (both cached under the work folder). Time split: training days 1-38, a 7-day gap, test days
   46-60, labels as ``finfeat train`` reads them.
2. Three xgboost models on that split: the parameters ``finfeat train`` used before
   (depth 6, learning rate 0.1, 300 trees), today's defaults, and ``--tune`` (prequential search
   inside the training period); each prints test ROC AUC, average precision and card
   precision@100 next to the logistic-regression baseline (the same for all three).
3. Unless ``--skip-latency``: a SQLite store materialized with the events before the test period,
   then ``--latency-samples`` test transactions scored one at a time through
   ``finfeat.jobs.score.score_request`` with the store and the tuned model opened once: p50/p95/p99
   of lookup + score, lookup + score + 5 reasons, and (when the audit trail is installed) lookup +
   score + reasons + audit enqueue.

Nothing is asserted; timings are wall clock on this machine.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "benchmarks"))

START = date(2024, 1, 1)
TRAIN = (START, START + timedelta(days=37))
TEST = (START + timedelta(days=45), START + timedelta(days=59))
OLD_DEFAULTS = {"max_depth": 6, "learning_rate": 0.1, "n_estimators": 300, "min_child_weight": 1.0,
                "subsample": 0.8, "class_weight": "balanced"}


def _warehouse(work: Path, events: int, seed: int) -> Path:
    from bench_train import _backfill

    from finfeat.jobs.generate import generate

    raw = work / f"generated_{events}.parquet"
    if not raw.exists():
        print(f"generating {events:,} events -> {raw}", file=sys.stderr)
        generate(out=raw, events=events, seed=seed, progress=False)
    wh = work / "generated_wh"
    stamp = wh / "_bench_source.txt"
    if not (stamp.exists() and stamp.read_text() == raw.name):
        t = time.perf_counter()
        _backfill([raw], "generated", wh, START, START + timedelta(days=59))
        stamp.write_text(raw.name)
        print(f"backfill {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return wh


def _train(wh: Path, out: Path, args: argparse.Namespace, **params) -> tuple[dict, dict, float]:  # noqa: ANN003
    from finfeat.jobs.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    info = train(TrainConfig(warehouse=str(wh), train_start=TRAIN[0], train_end=TRAIN[1], test_start=TEST[0],
                             test_end=TEST[1], seed=args.seed, threads=args.threads,
                             tune_candidates=args.tune_candidates, **params), out)
    return info, json.loads((out / "metrics.json").read_text()), time.perf_counter() - t


def _call(scorer, req, store, spec, kw: dict) -> dict:  # noqa: ANN001
    from finfeat.jobs.score import score_request

    kw = dict(kw)
    return score_request(kw.pop("_scorer", scorer), req, store=store, allow_missing=True, spec=spec, **kw)


def _latency(raw: Path, model: Path, work: Path, samples: int, seed: int) -> list[tuple[str, dict]]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from bench_train import _canonical_events

    from finfeat.jobs.online import materialize, open_store
    from finfeat.jobs.score import Scorer, score_request
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.default()
    events = _canonical_events([raw], "generated")
    t0 = pa.scalar(TEST[0], pa.date32()).cast(pa.timestamp("us", tz="UTC"))
    before = events.filter(pc.less(events.column("event_time"), t0))
    after = events.filter(pc.greater_equal(events.column("event_time"), t0)).sort_by("event_time")
    scorer = Scorer.load(model)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(after.num_rows, size=min(samples, after.num_rows), replace=False).tolist())
    requests = [{"txn_id": r["txn_id"], "card_token": r["card_token"], "merchant_id": r["merchant_id"],
                 "amount_minor": r["amount_minor"],
                 "at_us": int(pa.scalar(r["event_time"], pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py()),
                 "merchant_lat": r["merchant_lat"], "merchant_lon": r["merchant_lon"]}
                for r in after.take(pa.array(picks)).to_pylist()]
    db = work / "online.db"
    db.unlink(missing_ok=True)
    out = []
    with open_store(f"sqlite:{db}", spec) as store:
        materialize(store, before, spec)
        modes: list[tuple[str, dict]] = [("lookup + score", {"reasons": 0}), ("lookup + score + 5 reasons", {})]
        saabas_scorer = Scorer.load(model, reason_method="saabas")
        modes.append(("lookup + score + 5 saabas reasons", {"_scorer": saabas_scorer}))
        audit = None
        try:
            from finfeat.jobs.audit import AuditTrail

            shutil.rmtree(work / "audit", ignore_errors=True)
            audit = AuditTrail.open(work / "audit", caller="bench")
            modes.append(("lookup + score + reasons + audit", {"audit": audit}))
            modes.append(("lookup + score + saabas reasons + audit", {"audit": audit, "_scorer": saabas_scorer}))
        except ImportError:
            print("finfeat.jobs.audit is absent: the audit row is skipped", file=sys.stderr)
        try:
            for req in requests[: max(1, len(requests) // 10)]:  # warm up
                for _, kw in modes:
                    _call(scorer, req, store, spec, kw)
            # the modes take turns on every request, so the machine's noise hits them alike
            times: dict[str, list[float]] = {name: [] for name, _ in modes}
            for i, req in enumerate(requests):
                for name, kw in modes[i % len(modes):] + modes[: i % len(modes)]:
                    t = time.perf_counter_ns()
                    _call(scorer, req, store, spec, kw)
                    times[name].append((time.perf_counter_ns() - t) / 1e6)
            # the model alone, on the same feature rows: what the reasons add
            rows = [score_request(scorer, req, store=store, allow_missing=True, spec=spec, reasons=0)["features"]
                    for req in requests]
            from finfeat.jobs.score import feature_vector

            saabas = Scorer.load(model, reason_method="saabas")
            for key in ("score only (no lookup)", "score + 5 reasons (no lookup)", "score + 5 saabas reasons (no lookup)"):
                times[key] = []
            for row in rows:  # as score_request does: one booster call for score and margin, then the reasons
                x = feature_vector([row], scorer.features)
                t = time.perf_counter_ns()
                scorer.score_one(x)
                times["score only (no lookup)"].append((time.perf_counter_ns() - t) / 1e6)
                t = time.perf_counter_ns()
                _, margin = scorer.score_one(x)
                scorer.explain_rows(x, top=5, margins=np.array([margin]))
                times["score + 5 reasons (no lookup)"].append((time.perf_counter_ns() - t) / 1e6)
                t = time.perf_counter_ns()
                _, margin = saabas.score_one(x)
                saabas.explain_rows(x, top=5, margins=np.array([margin]))
                times["score + 5 saabas reasons (no lookup)"].append((time.perf_counter_ns() - t) / 1e6)
            for name, got in times.items():
                a = np.array(got)
                out.append((name, {"n": len(a), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                                   "p99": float(np.percentile(a, 99))}))
        finally:
            if audit is not None:
                audit.close()
    return out


def _print_latency(lat: list[tuple[str, dict]]) -> None:
    print(f"\n{'online, SQLite, tuned model':<40}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  target p99 < 2 ms")
    for name, r in lat:
        print(f"{name:<40}{r['n']:>6}{r['p50']:>9.2f}{r['p95']:>9.2f}{r['p99']:>9.2f}  "
              f"{'met' if r['p99'] < 2 else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="generated events (default 200,000)")
    ap.add_argument("--work", default=str(REPO / "out" / "bench_models"), help="scratch folder (cached inputs)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune-candidates", type=int, default=8)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--latency-only", action="store_true", help="only the latency part, with the tuned model of an "
                                                                "earlier run in --work")
    ap.add_argument("--latency-samples", type=int, default=2000)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wh = _warehouse(work, args.events, args.seed)
    if args.latency_only:
        _print_latency(_latency(work / f"generated_{args.events}.parquet", work / "model_tuned", work,
                                args.latency_samples, args.seed))
        return 0

    runs = [("old defaults (depth 6, lr 0.1, 300 trees)", work / "model_old", OLD_DEFAULTS),
            ("defaults", work / "model_default", {}), ("tuned (--tune)", work / "model_tuned", {"tune": True})]
    rows = []
    for name, out, params in runs:
        info, m, wall = _train(wh, out, args, **params)
        rows.append((name, info, m, wall))
        print(f"{name}: {wall:.0f} s", file=sys.stderr)

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    k = rows[0][2]["k"]
    _, info0, m0, _ = rows[0]
    print(f"\ngenerated {args.events:,} events; train {TRAIN[0]}..{TRAIN[1]} ({info0['train_rows']:,} rows, "
          f"{info0['train_fraud']:,} fraud), test {TEST[0]}..{TEST[1]} ({m0['test_rows']:,} rows, "
          f"{m0['test_fraud']:,} fraud)\n")
    print(f"{'model':<46}{'ROC AUC':>9}{'AP':>9}{'cP@' + str(k):>9}{'train s':>9}  parameters")
    for name, info, m, wall in rows:
        p = info["xgboost_params"]
        params = (f"depth {p['max_depth']}, lr {p['learning_rate']}, {p['num_boost_round']} trees, mcw "
                  f"{p['min_child_weight']}, subsample {p['subsample']}, class weight "
                  f"{info['class_imbalance']['xgboost_class_weight']}")
        r = m["xgboost"]
        print(f"{'xgboost ' + name:<46}{f(r['roc_auc']):>9}{f(r['average_precision']):>9}"
              f"{f(r['card_precision_at_' + str(k)]):>9}{wall:>9.0f}  {params}")
    r = m0["logistic_regression"]
    print(f"{'logistic regression (baseline)':<46}{f(r['roc_auc']):>9}{f(r['average_precision']):>9}"
          f"{f(r['card_precision_at_' + str(k)]):>9}")
    search = rows[2][1]["search"]
    print(f"\ntuning: {len(search['candidates'])} candidates x {len(search['folds'])} folds; top 5 by mean validation AP:")
    for c in search["candidates"][:5]:
        print(f"  depth {c['max_depth']}, lr {c['learning_rate']}, {c['n_estimators']} trees, mcw {c['min_child_weight']},"
              f" subsample {c['subsample']}, {c['class_weight']}: {c['mean_ap']:.4f} +- {c['std_ap']:.4f}")
    if not args.skip_latency:
        raw = work / f"generated_{args.events}.parquet"
        _print_latency(_latency(raw, work / "model_tuned", work, args.latency_samples, args.seed))
    print(f"\n(threads {args.threads}, seed {args.seed}; models and reports in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
