"""``finfeat explain``: one decision's reason codes as a waterfall chart (PNG).

The request is what ``finfeat score --json`` takes: the feature row itself, or with ``--store``
a candidate transaction whose features are looked up in the online store. The chart starts at
the model's bias (base log-odds), adds the ``--top`` largest contributions (xgboost's tree SHAP,
largest absolute value first), folds the rest into one "other inputs" bar and ends at the
decision's log-odds; the title gives the score. The explanation (every input's contribution)
is printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_TOP = 10


def plot_waterfall(path: str | Path, explained: dict[str, Any], *, top: int = DEFAULT_TOP) -> Path:
    """Write the waterfall of one decision (``score_request`` output with every input's reason)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reasons = explained["reasons"]
    shown, rest = reasons[:top], reasons[top:]
    steps = [(f"{r['feature']} = {_value(r['value'])}", r["contribution"]) for r in shown]
    if rest:
        steps.append((f"{len(rest)} other inputs", sum(r["contribution"] for r in rest)))
    fig, ax = plt.subplots(figsize=(8, 0.42 * (len(steps) + 2) + 1.2), dpi=100)
    level = explained["bias"]
    seen = [0.0, level, explained["margin"]]
    labels = ["bias (base log-odds)"]
    ax.barh(0, level, color="#999999")
    ax.text(level, 0, f" {level:+.3f} ", va="center", ha="left" if level > 0 else "right", fontsize=8)
    for i, (label, c) in enumerate(steps, start=1):
        ax.barh(i, c, left=level, color="#c0392b" if c > 0 else "#2e86c1")
        ax.text(level + c, i, f" {c:+.3f}", va="center", ha="left" if c > 0 else "right", fontsize=8)
        level += c
        seen.append(level)
        labels.append(label)
    end = len(steps) + 1
    ax.barh(end, explained["margin"], color="#555555")
    ax.text(explained["margin"], end, f" {explained['margin']:+.3f} ", va="center",
            ha="left" if explained["margin"] > 0 else "right", fontsize=8)
    lo, hi = min(seen), max(seen)
    pad = 0.18 * (hi - lo or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    labels.append("decision (log-odds)")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set(xlabel="log-odds of fraud (red raises, blue lowers)",
           title=f"score {explained['score']:.4f} (log-odds {explained['margin']:+.3f}), model {explained['model_id']}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _value(v: float | None) -> str:
    if v is None:
        return "missing"
    return f"{v:.4g}"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("explain", help="one decision's reason codes as a waterfall chart (PNG)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--model", required=True, help="model folder written by `finfeat train`")
    p.add_argument("--json", required=True, help="one transaction as JSON (as for `finfeat score --json`)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"contributions drawn one by one (default {DEFAULT_TOP})")
    p.add_argument("--store", help="the online store, sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="Redis key namespace")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a card or merchant without stored state as having no history")
    p.add_argument("--feature-spec", help="feature spec YAML of the store (default: built-in v1)")
    return p


def run(args: argparse.Namespace) -> int:
    from finfeat.jobs.score import Scorer, ScoringError, score_request

    if args.top < 1:
        print("finfeat explain: error: --top must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        request = json.loads(args.json)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"finfeat explain: error: --json is not a JSON object: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        scorer = Scorer.load(args.model)
        spec = None
        if args.feature_spec:
            from finfeat.transforms.spec import FeatureSpec

            spec = FeatureSpec.from_yaml(args.feature_spec)
        out = score_request(scorer, request, store_url=args.store, allow_missing=args.allow_missing,
                            namespace=args.namespace, spec=spec, reasons=len(scorer.features))
    except (ScoringError, ValueError) as exc:
        print(f"finfeat explain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    where = plot_waterfall(args.out, out, top=args.top)
    print(json.dumps(out, indent=2))
    print(f"finfeat explain: waterfall -> {where}", file=sys.stderr)
    return EXIT_OK
