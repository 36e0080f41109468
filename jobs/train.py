"""``finfeat train``: an xgboost fraud model on explicit time windows, against a logistic-regression baseline.

Windows (UTC event dates, inclusive), no random split::

    [train_start .. train_end]  gap (>= 0 days, default the label delay)  [test_start .. test_end]

* The training rows are the training set of the training period with the labels known at the
  start of the test period (cut-off ``test_start 00:00Z``): what a model deployed then could
  have learnt from. With a gap of at least the label delay, every training transaction is past
  the maturity window (see :mod:`finfeat.jobs.training` for the rule).
* The test rows are the training set of the test period with the labels known at
  ``--test-cutoff`` (default: ``test_end + 1 day + label delay``, when every test label has
  matured).
* Both sets read the same pinned Delta versions (recorded in ``run.json``).

Class imbalance: xgboost's ``scale_pos_weight`` = negatives / positives of the training period;
the baseline uses ``class_weight="balanced"`` (the same reweighting). No resampling.
The baseline: nulls imputed with the training medians plus a missing indicator per column that
had nulls in training, standardized, L2 logistic regression. One seed drives both models
(xgboost's row/column subsampling); the same seed, data and thread count give the same model.

Model inputs: the feature spec's columns plus ``amount_minor`` (known at request time).

Metrics on the test period (ranked by log-odds, which order like the probabilities but do not tie
where float probabilities saturate at 1.0): ROC AUC, average precision, and card precision@k per day (k = 100):
each day, a card's score is its highest transaction score and it counts as fraudulent if any of
its transactions that day is; the share of fraudulent cards among the top k (ties: card token),
over min(k, cards that day), averaged over the test days.

The model folder: ``model.json`` (xgboost), ``features.json`` (inputs, spec hash),
``run.json`` (windows, cut-offs, Delta versions, counts, parameters), ``metrics.json``,
``baseline_logreg.json``, ``test_predictions.parquet``, ``pr_curve.png``,
``feature_importance.png`` and ``report.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# xgboost's OpenMP threads spin while they wait by default: on a small machine shared with other
# work, 2 spinning threads ran 10x slower than one. Passive waiting costs nothing when idle. Set
# before xgboost (and its OpenMP runtime) is first imported; an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finfeat.jobs.score import FEATURES_FILE, MODEL_FILE, feature_matrix, model_inputs
from finfeat.jobs.training import (
    DEFAULT_LABEL_DELAY_DAYS,
    TrainingSet,
    TrainingSetError,
    TrainingSetRequest,
    build_training_set,
    day_start,
    iso,
)

DEFAULT_K = 100


class TrainError(ValueError):
    """The windows or the data cannot give a model (no fraud in training, overlapping windows)."""


@dataclass(frozen=True)
class TrainConfig:
    warehouse: str
    train_start: date
    train_end: date
    test_end: date
    test_start: date | None = None
    gap_days: int | None = None
    label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS
    test_cutoff: datetime | None = None
    features_version: int | None = None
    labels_version: int | None = None
    seed: int = 7
    n_estimators: int = 300
    max_depth: int = 6
    learning_rate: float = 0.1
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    threads: int = 2
    k: int = DEFAULT_K
    engine: str = "local"

    def windows(self) -> dict[str, Any]:
        """Resolved windows; raises :class:`TrainError` when they overlap or are empty."""
        gap = self.gap_days if self.gap_days is not None else int(np.ceil(self.label_delay_days))
        if gap < 0:
            raise TrainError("the gap cannot be negative")
        if self.train_end < self.train_start:
            raise TrainError(f"--train-end {self.train_end} is before --train-start {self.train_start}")
        earliest = self.train_end + timedelta(days=gap + 1)
        test_start = self.test_start or earliest
        if test_start < earliest:
            raise TrainError(f"the test period starts {test_start}, inside the training period plus the {gap}-day gap "
                             f"(the earliest start is {earliest})")
        if self.test_end < test_start:
            raise TrainError(f"--test-end {self.test_end} is before the test start {test_start}")
        train_cutoff = day_start(test_start)
        test_cutoff = self.test_cutoff or (day_start(self.test_end + timedelta(days=1))
                                           + timedelta(days=self.label_delay_days))
        return {"train": [self.train_start.isoformat(), self.train_end.isoformat()], "gap_days": gap,
                "actual_gap_days": (test_start - self.train_end).days - 1,
                "test": [test_start.isoformat(), self.test_end.isoformat()],
                "train_cutoff": iso(train_cutoff), "test_cutoff": iso(test_cutoff),
                "label_delay_days": self.label_delay_days,
                "_test_start": test_start, "_train_cutoff": train_cutoff, "_test_cutoff": test_cutoff}


# ----------------------------------------------------------------------------------- metrics


def card_precision_at_k(day: np.ndarray, card: np.ndarray, score: np.ndarray, label: np.ndarray, k: int = DEFAULT_K
                        ) -> tuple[float | None, list[dict[str, Any]]]:
    """Mean over days of the fraud share among the day's top-k cards (see the module docstring)."""
    import pandas as pd

    if len(score) == 0:
        return None, []
    df = pd.DataFrame({"day": day, "card": card, "score": score, "fraud": label.astype(bool)})
    cards = df.groupby(["day", "card"], sort=True).agg(score=("score", "max"), fraud=("fraud", "any")).reset_index()
    per_day = []
    for d, g in cards.groupby("day", sort=True):
        top = g.sort_values(["score", "card"], ascending=[False, True], kind="mergesort").head(k)
        per_day.append({"day": str(d), "cards": int(len(g)), "top": int(len(top)),
                        "fraud_cards_in_top": int(top["fraud"].sum()), "fraud_cards": int(g["fraud"].sum()),
                        "precision": float(top["fraud"].sum() / len(top))})
    return float(np.mean([p["precision"] for p in per_day])), per_day


def metrics_for(label: np.ndarray, score: np.ndarray, day: np.ndarray, card: np.ndarray, k: int) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    both = 0 < label.sum() < len(label)
    cp, per_day = card_precision_at_k(day, card, score, label, k)
    return {
        "roc_auc": float(roc_auc_score(label, score)) if both else None,
        "average_precision": float(average_precision_score(label, score)) if both else None,
        f"card_precision_at_{k}": cp,
        "card_precision_per_day": per_day,
    }


# ----------------------------------------------------------------------------------- models


def fit_xgboost(x: np.ndarray, y: np.ndarray, names: list[str], cfg: TrainConfig, scale_pos_weight: float) -> Any:
    import xgboost as xgb

    params = xgb_params(cfg, scale_pos_weight)
    dtrain = xgb.DMatrix(x, label=y.astype(np.float32), missing=np.nan, feature_names=names)
    return xgb.train(params, dtrain, num_boost_round=cfg.n_estimators)


def xgb_params(cfg: TrainConfig, scale_pos_weight: float) -> dict[str, Any]:
    return {"objective": "binary:logistic", "eval_metric": "aucpr", "tree_method": "hist",
            "max_depth": cfg.max_depth, "learning_rate": cfg.learning_rate, "subsample": cfg.subsample,
            "colsample_bytree": cfg.colsample_bytree, "scale_pos_weight": scale_pos_weight,
            "seed": cfg.seed, "nthread": cfg.threads}


def fit_logreg(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed))
    model.fit(x, y)
    return model


def logreg_json(model: Any, names: list[str]) -> dict[str, Any]:
    imputer, scaler, lr = model.steps[0][1], model.steps[1][1], model.steps[2][1]
    indicators = [names[i] for i in imputer.indicator_.features_] if imputer.indicator_ is not None else []
    expanded = [*names, *(f"missing:{n}" for n in indicators)]
    return {"inputs": names, "medians": dict(zip(names, map(float, imputer.statistics_))),
            "missing_indicators": indicators, "scaled_columns": expanded,
            "mean": list(map(float, scaler.mean_)), "scale": list(map(float, scaler.scale_)),
            "coef": dict(zip(expanded, map(float, lr.coef_[0]))), "intercept": float(lr.intercept_[0]),
            "class_weight": "balanced"}


# ----------------------------------------------------------------------------------- plots


def plot_pr(path: Path, label: np.ndarray, scores: dict[str, np.ndarray], ap: dict[str, float | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if 0 < label.sum() < len(label):
        for name, s in scores.items():
            p, r, _ = precision_recall_curve(label, s)
            a = ap.get(name)
            ax.step(r, p, where="post", label=f"{name} (AP {a:.3f})" if a is not None else name)
        ax.axhline(label.mean(), color="grey", lw=0.8, ls="--", label=f"fraud rate {label.mean():.4f}")
    else:
        ax.text(0.5, 0.5, "no fraud (or no genuine) transaction in the test period", ha="center")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall, test period")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_importance(path: Path, gain: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(gain.items(), key=lambda kv: (kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.28 * len(items) + 1)), dpi=100)
    ax.barh([k for k, _ in items], [v for _, v in items], color="#3b6ea5")
    ax.set(xlabel="total gain", title="xgboost feature importance (gain)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------- the run


def _xy(ts: TrainingSet, inputs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    x = feature_matrix(ts.table, inputs)
    y = ts.table.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    return x, y


def train(cfg: TrainConfig, out: str | Path, *, spark: Any = None) -> dict[str, Any]:
    """Build both sets, fit both models, evaluate, write the model folder; returns ``run.json``."""
    import sklearn
    import xgboost as xgb

    started = time.perf_counter()
    w = cfg.windows()
    base = TrainingSetRequest.from_warehouse(
        cfg.warehouse, start=cfg.train_start, end=cfg.train_end, cutoff=w["_train_cutoff"],
        label_delay_days=cfg.label_delay_days, features_version=cfg.features_version,
        labels_version=cfg.labels_version).pinned()
    train_set = build_training_set(base, engine=cfg.engine, spark=spark)
    test_req = TrainingSetRequest(features_path=base.features_path, labels_path=base.labels_path,
                                  start=w["_test_start"], end=cfg.test_end, cutoff=w["_test_cutoff"],
                                  label_delay_days=cfg.label_delay_days, features_version=base.features_version,
                                  labels_version=base.labels_version)
    test_set = build_training_set(test_req, engine=cfg.engine, spark=spark)
    t_data = time.perf_counter() - started

    inputs = model_inputs(train_set.feature_columns)
    x_train, y_train = _xy(train_set, inputs)
    x_test, y_test = _xy(test_set, inputs)
    pos, neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    if pos == 0 or neg == 0:
        raise TrainError(f"the training period has {pos} fraud and {neg} genuine labelled transactions: both are "
                         "needed (widen the training period or check the labels table)")
    if len(y_test) == 0:
        raise TrainError("the test period has no labelled transaction")
    spw = neg / pos

    t0 = time.perf_counter()
    booster = fit_xgboost(x_train, y_train, inputs, cfg, spw)
    t_xgb = time.perf_counter() - t0
    t0 = time.perf_counter()
    logreg = fit_logreg(x_train, y_train, cfg.seed)
    t_lr = time.perf_counter() - t0

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / MODEL_FILE))
    spec_hash = train_set.manifest["features"]["spec_hash"]
    (folder / FEATURES_FILE).write_text(json.dumps(
        {"features": inputs, "spec_features": train_set.feature_columns, "extra_inputs": inputs[len(train_set.feature_columns):],
         "spec_hash": spec_hash, "missing_value": "NaN (null); booleans 0/1"}, indent=2) + "\n")
    from finfeat.jobs.score import Scorer

    scorer = Scorer.load(folder)
    t0 = time.perf_counter()
    s_xgb = scorer.score_matrix(x_test)
    t_score = time.perf_counter() - t0
    s_lr = logreg.predict_proba(x_test)[:, 1].astype(np.float64)
    # Metrics rank by log-odds: the same order as the probabilities, without the ties where
    # probabilities saturate at 1.0 (hundreds of test rows for the baseline on Sparkov).
    r_xgb = scorer.score_matrix(x_test, margin=True)
    r_lr = logreg.decision_function(x_test).astype(np.float64)

    day = test_set.table.column("event_date").cast(pa.string()).to_numpy(zero_copy_only=False)
    card = test_set.table.column("card_token").to_numpy(zero_copy_only=False)
    metrics = {
        "k": cfg.k, "test_rows": int(len(y_test)), "test_fraud": int(y_test.sum()),
        "test_days": int(len(np.unique(day))),
        "ranked_by": "log-odds (xgboost margin, logistic-regression decision function)",
        "xgboost": metrics_for(y_test, r_xgb, day, card, cfg.k),
        "logistic_regression": metrics_for(y_test, r_lr, day, card, cfg.k),
    }

    (folder / "baseline_logreg.json").write_text(json.dumps(logreg_json(logreg, inputs), indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    preds = pa.table({
        "txn_id": test_set.table.column("txn_id"), "card_token": test_set.table.column("card_token"),
        "event_time": test_set.table.column("event_time"), "event_date": test_set.table.column("event_date"),
        "amount_minor": test_set.table.column("amount_minor"), "label": test_set.table.column("label"),
        "label_status": test_set.table.column("label_status"),
        "score_xgboost": pa.array(s_xgb, pa.float64()), "score_logreg": pa.array(s_lr, pa.float64()),
        "logodds_xgboost": pa.array(r_xgb, pa.float64()), "logodds_logreg": pa.array(r_lr, pa.float64()),
    })
    pq.write_table(preds, folder / "test_predictions.parquet", compression="zstd")

    gain = {k: float(v) for k, v in booster.get_score(importance_type="gain").items()}
    plot_pr(folder / "pr_curve.png", y_test, {"xgboost": r_xgb, "logistic regression": r_lr},
            {"xgboost": metrics["xgboost"]["average_precision"],
             "logistic regression": metrics["logistic_regression"]["average_precision"]})
    plot_importance(folder / "feature_importance.png", gain)

    run_info = {
        "windows": {k: v for k, v in w.items() if not k.startswith("_")},
        "delta_versions": {"features": base.features_version, "labels": base.labels_version},
        "tables": {"features": base.features_path, "labels": base.labels_path},
        "spec_hash": spec_hash,
        "training_set": train_set.manifest, "test_set": test_set.manifest,
        "train_rows": int(len(y_train)), "train_fraud": pos, "train_genuine": neg,
        "class_imbalance": {"xgboost_scale_pos_weight": spw, "logreg_class_weight": "balanced",
                            "computed_from": "training period (negatives / positives)"},
        "seed": cfg.seed, "xgboost_params": {**xgb_params(cfg, spw), "num_boost_round": cfg.n_estimators},
        "config": {k: (v.isoformat() if isinstance(v, (date, datetime)) else v) for k, v in asdict(cfg).items()},
        "versions": {"xgboost": xgb.__version__, "scikit-learn": sklearn.__version__},
        "seconds": {"training_sets": round(t_data, 3), "xgboost_fit": round(t_xgb, 3), "logreg_fit": round(t_lr, 3),
                    "xgboost_score_test": round(t_score, 3), "total": round(time.perf_counter() - started, 3)},
        "model_id": scorer.model_id,
    }
    (folder / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    (folder / "report.md").write_text(report_md(run_info, metrics, gain))
    return run_info


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def report_md(run: dict[str, Any], metrics: dict[str, Any], gain: dict[str, float]) -> str:
    w, k = run["windows"], metrics["k"]
    tr, te = run["training_set"]["counts"], run["test_set"]["counts"]
    cpk = f"card_precision_at_{k}"
    x, lr = metrics["xgboost"], metrics["logistic_regression"]
    lines = [
        "# finfeat fraud model", "",
        f"Model `{run['model_id']}` (xgboost {run['versions']['xgboost']}), feature spec `{run['spec_hash']}`.", "",
        "## Data", "",
        "| | period (event dates, UTC) | label cut-off | rows | fraud | assumed genuine | excluded (immature) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        f"| train | {w['train'][0]} .. {w['train'][1]} | {w['train_cutoff']} | {tr['rows']:,} | {tr['matured_fraud']:,} "
        f"| {tr['assumed_negative']:,} | {tr['immature']:,} |",
        f"| test | {w['test'][0]} .. {w['test'][1]} | {w['test_cutoff']} | {te['rows']:,} | {te['matured_fraud']:,} "
        f"| {te['assumed_negative']:,} | {te['immature']:,} |", "",
        f"Gap between the periods: {w['actual_gap_days']} day(s) without data between the last training day and the "
        f"first test day (at least {w['gap_days']} required); label delay (maturity window): "
        f"{w['label_delay_days']} day(s). No random split: the test period is strictly later than the training "
        "period plus the gap.",
        f"Delta versions: features v{run['delta_versions']['features']}, labels v{run['delta_versions']['labels']} "
        f"({run['tables']['features']}, {run['tables']['labels']}).",
        "Labels: only labels with `label_time <= cut-off` count; a transaction without one counts as genuine only if "
        "it is older than the cut-off minus the label delay, otherwise it is left out.", "",
        "## Class imbalance", "",
        f"Training period: {run['train_fraud']:,} fraud vs {run['train_genuine']:,} genuine. xgboost uses "
        f"`scale_pos_weight = {run['class_imbalance']['xgboost_scale_pos_weight']:.2f}` (genuine / fraud of the "
        "training period); the logistic regression uses `class_weight=\"balanced\"`. No resampling.", "",
        "## Test metrics", "",
        f"| model | ROC AUC | average precision | card precision@{k} (mean over {metrics['test_days']} day(s)) |",
        "| --- | ---: | ---: | ---: |",
        f"| xgboost | {_fmt(x['roc_auc'])} | {_fmt(x['average_precision'])} | {_fmt(x[cpk])} |",
        f"| logistic regression (baseline) | {_fmt(lr['roc_auc'])} | {_fmt(lr['average_precision'])} | "
        f"{_fmt(lr[cpk])} |", "",
        f"Test period: {metrics['test_rows']:,} transactions, {metrics['test_fraud']:,} fraud "
        f"({metrics['test_fraud'] / max(metrics['test_rows'], 1):.4%}).",
        f"Card precision@{k}: each day a card scores its highest transaction score and is fraudulent if any of its "
        f"transactions that day is; the fraudulent share of the day's top {k} cards (of all cards on days with fewer). "
        "All metrics rank by log-odds (same order as the probabilities, without ties where probabilities saturate).",
        "", "| day | cards | fraud cards | xgboost top-k fraud | logreg top-k fraud |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for a, b in zip(x["card_precision_per_day"], lr["card_precision_per_day"]):
        lines.append(f"| {a['day']} | {a['cards']:,} | {a['fraud_cards']:,} | {a['fraud_cards_in_top']} / {a['top']} | "
                     f"{b['fraud_cards_in_top']} / {b['top']} |")
    top = sorted(gain.items(), key=lambda kv: -kv[1])[:10]
    lines += ["", "![precision-recall](pr_curve.png)", "", "## Feature importance (xgboost, gain)", "",
              "| feature | gain |", "| --- | ---: |", *(f"| {n} | {g:.2f} |" for n, g in top), "",
              "![feature importance](feature_importance.png)", "",
              "## Reproducing", "",
              f"Seed {run['seed']}, {run['config']['threads']} thread(s), {run['config']['n_estimators']} trees, "
              f"max depth {run['config']['max_depth']}, learning rate {run['config']['learning_rate']}; the same "
              "command with the same Delta versions (`--features-version`, `--labels-version`) gives the same model.",
              "", "Files: `model.json`, `features.json`, `run.json`, `metrics.json`, `baseline_logreg.json`, "
              "`test_predictions.parquet`, `pr_curve.png`, `feature_importance.png`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from finfeat.jobs.training import _date, _version, parse_time

    p = subparsers.add_parser("train", help="train an xgboost fraud model on time windows, with a baseline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    p.add_argument("--train-start", type=_date, required=True)
    p.add_argument("--train-end", type=_date, required=True)
    p.add_argument("--test-start", type=_date, help="default: train end + gap + 1 day")
    p.add_argument("--test-end", type=_date, required=True)
    p.add_argument("--gap-days", type=int, help="days between the periods (default: the label delay)")
    p.add_argument("--label-delay-days", type=float, default=DEFAULT_LABEL_DELAY_DAYS,
                   help="maturity window of the labels (default 7)")
    p.add_argument("--test-cutoff", type=parse_time,
                   help="label cut-off of the test period (default: test end + 1 day + label delay)")
    p.add_argument("--features-version", type=_version)
    p.add_argument("--labels-version", type=_version)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--n-estimators", type=int, default=300)
    p.add_argument("--max-depth", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--k", type=int, default=DEFAULT_K, help="cards per day for card precision@k (default 100)")
    p.add_argument("--engine", choices=["local", "spark"], default="local", help="training-set engine")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(warehouse=args.warehouse, train_start=args.train_start, train_end=args.train_end,
                      test_start=args.test_start, test_end=args.test_end, gap_days=args.gap_days,
                      label_delay_days=args.label_delay_days, test_cutoff=args.test_cutoff,
                      features_version=args.features_version, labels_version=args.labels_version, seed=args.seed,
                      n_estimators=args.n_estimators, max_depth=args.max_depth, learning_rate=args.learning_rate,
                      threads=args.threads, k=args.k, engine=args.engine)
    try:
        info = train(cfg, args.out)
    except (TrainError, TrainingSetError) as exc:
        print(f"finfeat train: error: {exc}", file=sys.stderr)
        return 2
    m = json.loads((Path(args.out) / "metrics.json").read_text())
    k = m["k"]
    print(f"trained on {info['windows']['train'][0]}..{info['windows']['train'][1]} ({info['train_rows']:,} rows, "
          f"{info['train_fraud']:,} fraud, scale_pos_weight {info['class_imbalance']['xgboost_scale_pos_weight']:.1f}); "
          f"tested on {info['windows']['test'][0]}..{info['windows']['test'][1]} ({m['test_rows']:,} rows, "
          f"{m['test_fraud']:,} fraud)")
    for name in ("xgboost", "logistic_regression"):
        r = m[name]
        print(f"  {name:<20} ROC AUC {_fmt(r['roc_auc'])}  AP {_fmt(r['average_precision'])}  "
              f"card P@{k} {_fmt(r[f'card_precision_at_{k}'])}")
    print(f"  -> {args.out} (report.md, model.json, metrics.json, test_predictions.parquet)")
    return 0


__all__ = ["TrainConfig", "TrainError", "add_parser", "card_precision_at_k", "run", "train"]
