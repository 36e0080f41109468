"""``finfeat features``: the feature spec's features, one line each, or one in detail.

  finfeat features                  a table: name, entity, aggregation, window, type, nulls
  finfeat features --json           the same as JSON (with field, delay, reach and description)
  finfeat features describe NAME    one feature: its definition, window rule and null meaning
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

WINDOW_RULE = ("For a transaction x of entity e at time t, the W-window holds e's transactions y with "
               "(y.event_time, y.txn_id) < (t, x.txn_id) and y.event_time > t - W; x is never in its own window.")

_DESCRIPTIONS = {
    "count": "number of the {e}'s transactions in the {w} window",
    "sum": "sum of the {e}'s transaction amounts in the {w} window, integer minor units",
    "avg": "mean transaction amount of the {e} in the {w} window, minor units",
    "max": "largest transaction amount of the {e} in the {w} window, minor units",
    "min": "smallest transaction amount of the {e} in the {w} window, minor units",
    "std": "sample standard deviation of the {e}'s amounts in the {w} window, minor units",
    "zscore": "(this amount - mean of the {w} window) / its sample standard deviation",
    "distinct": "number of distinct {f}s among the {e}'s transactions in the {w} window",
    "is_new": "this transaction's {f} does not occur among the {e}'s transactions in the {w} window",
    "seconds_since_last": "seconds since the {e}'s previous transaction (no window: however old it is)",
    "geo_velocity": "haversine distance (R = 6371 km) from the {e}'s latest earlier located transaction "
                    "(merchant coordinates) over the elapsed hours, km/h",
    "hour_of_day": "hour of the transaction, UTC (0-23)",
    "day_of_week": "day of the week of the transaction, UTC (Monday = 0)",
    "is_weekend": "the transaction falls on a Saturday or Sunday, UTC",
    "fraud_rate": "share of the {e}'s transactions in (t - {d} - {w}, t - {d}] whose fraud label was known before t",
}
_NULLS = {
    "count": "never null (0 for an empty window)",
    "sum": "never null (0 for an empty window)",
    "avg": "null when the window is empty",
    "max": "null when the window is empty",
    "min": "null when the window is empty",
    "std": "null for fewer than 2 values or when all values are equal",
    "zscore": "null where the standard deviation is null",
    "distinct": "never null (0 for an empty window)",
    "is_new": "never null (true for an empty window)",
    "seconds_since_last": "null for the entity's first transaction",
    "geo_velocity": "null without an earlier located transaction, or with zero elapsed time",
    "hour_of_day": "never null",
    "day_of_week": "never null",
    "is_weekend": "never null",
    "fraud_rate": "null when the delayed window is empty",
}


def describe(f: Any) -> dict[str, Any]:
    """One feature definition as a flat dict a person (or a catalogue) can read."""
    return {
        "name": f.name, "entity": f.entity, "aggregation": f.agg, "field": f.field, "window": f.window,
        "delay": f.delay, "reach_seconds": f.reach_us // 1_000_000, "type": str(f.arrow_type),
        "nulls": _NULLS[f.agg],
        "description": _DESCRIPTIONS[f.agg].format(e=f.entity, w=f.window or "", f=f.field or "", d=f.delay or ""),
    }


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("features", help="list the feature spec's features, or describe one",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("words", nargs="*", metavar="describe NAME", help="describe one feature in detail")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--feature-spec", help="feature spec YAML (default: the built-in v1 set)")
    return p


def run(args: argparse.Namespace) -> int:
    import difflib

    from finfeat.transforms.spec import FeatureSpec, SpecError

    try:
        spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    except SpecError as exc:
        print(f"finfeat features: error: {exc}", file=sys.stderr)
        return 2
    rows = [describe(f) for f in spec.features]
    if args.words:
        if args.words[0] != "describe" or len(args.words) != 2:
            print("finfeat features: error: usage: finfeat features [--json] | finfeat features describe NAME",
                  file=sys.stderr)
            return 2
        name = args.words[1]
        found = [r for r in rows if r["name"] == name]
        if not found:
            close = difflib.get_close_matches(name, [r["name"] for r in rows], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `finfeat features` lists them"
            print(f"finfeat features: error: no feature {name!r} in spec {spec.spec_hash}{hint}", file=sys.stderr)
            return 2
        row = found[0]
        if args.json:
            print(json.dumps({**row, "spec_hash": spec.spec_hash, "window_rule": WINDOW_RULE}, indent=2))
            return 0
        for key in ("name", "description", "entity", "aggregation", "field", "window", "delay", "type", "nulls"):
            if row[key] is not None:
                print(f"{key:<12} {row[key]}")
        print(f"{'reach':<12} {row['reach_seconds']:,} s of history")
        print(f"{'spec':<12} {spec.spec_hash}")
        if row["window"]:
            print(f"\n{WINDOW_RULE}")
        return 0
    if args.json:
        print(json.dumps({"spec_hash": spec.spec_hash, "features": rows}, indent=2))
        return 0
    cols = ("name", "entity", "aggregation", "window", "type", "nulls")
    widths = {c: max(len(c), *(len(str(r[c] or "-")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r[c] or "-").ljust(widths[c]) for c in cols).rstrip())
    print(f"\n{len(rows)} features, spec {spec.spec_hash}; `finfeat features describe NAME` for one in detail")
    return 0
