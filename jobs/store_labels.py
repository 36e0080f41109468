"""``finfeat store-labels``: write a labels feed (chargebacks, confirmed fraud) to the online store.

The store then serves label-aware features (``merchant_fraud_rate_*``) with these labels, as the
backfill computes them with the same feed: per transaction the latest label time wins, a label
counts only once known. Files are read and checked as ``finfeat backfill --labels`` reads them
(columns ``txn_id``, ``is_fraud``, ``label_time``; CSV, JSON Lines or Parquet); bad rows are dead
letters with a reason, and ``label rows read = labels accepted + dead letters`` is checked.
Writing the same file again changes nothing.

Exit codes: 0 written (dead letters, if any, are reported); 2 usage or configuration error (a
bad flag or file, a spec without label-aware features, a store written for another spec); 4 the
store is unreachable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from pathlib import Path

_LOG = logging.getLogger(__name__)
EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 4
_BATCH = 5_000


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "store-labels", help="write a labels feed to the online store (for label-aware features)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--store", required=True, help="sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="Redis key namespace (default ff:v1)")
    p.add_argument("--labels", action="append", required=True, metavar="FILE",
                   help="a labels file (txn_id, is_fraud, label_time); repeatable")
    p.add_argument("--feature-spec", help="feature spec YAML with label-aware features (default: the built-in "
                                          "v1 set, which has none)")
    p.add_argument("--dead-letters", metavar="PATH", help="also write the rejected rows here, as JSON Lines")
    return p


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from finfeat.jobs.online import OnlineStoreError, StoreSpecMismatch, StoreUnavailable, open_store
    from finfeat.jobs.online.base import wall_clock_us
    from finfeat.jobs.sources import read_labels_file
    from finfeat.schemas.mapping import MappingError
    from finfeat.transforms.labels import parse_labels
    from finfeat.transforms.spec import FeatureSpec, SpecError

    def usage(message: object) -> int:
        print(f"finfeat store-labels: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    except SpecError as exc:
        return usage(exc)
    if not spec.needs_labels:
        return usage("the feature spec has no label-aware feature (such as merchant fraud_rate), so the store keeps "
                     "no labels; pass the --feature-spec the store was materialized with")
    files = [Path(f) for f in args.labels]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return usage(f"labels file(s) {', '.join(missing)} do not exist")
    run_id, recorded = uuid.uuid4().hex, wall_clock_us()
    report: dict[str, object] = {"store": args.store, "files": [str(f) for f in files]}
    read = accepted = written = 0
    dead_parts: list[pa.Table] = []
    try:
        store = open_store(args.store, spec, create=False, namespace=args.namespace)
    except ValueError as exc:
        return usage(exc)
    except StoreUnavailable as exc:
        print(f"finfeat store-labels: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        with store:
            for path in files:
                for raw, unreadable in read_labels_file(path, run_id=run_id, recorded_at_us=recorded):
                    labels, dead = parse_labels(raw, source=path.name, run_id=run_id, recorded_at_us=recorded)
                    read += raw.num_rows + unreadable.num_rows
                    accepted += labels.num_rows
                    dead_parts += [t for t in (unreadable, dead) if t.num_rows]
                    for start in range(0, labels.num_rows, _BATCH):
                        written += store.write_labels(labels.slice(start, _BATCH)).labels
                    _LOG.info("labels file %s: %d labels written so far", path.name, written)
    except (MappingError, StoreSpecMismatch) as exc:
        return usage(exc)
    except StoreUnavailable as exc:
        print(f"finfeat store-labels: {exc} (writes are idempotent: run it again)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except OnlineStoreError as exc:
        print(f"finfeat store-labels: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    dead = pa.concat_tables(dead_parts) if dead_parts else None
    n_dead = dead.num_rows if dead is not None else 0
    if read != accepted + n_dead:  # a bug, never expected
        return usage(f"label rows read {read} != labels accepted {accepted} + dead letters {n_dead}")
    by_reason: dict[str, int] = {}
    for reason in (dead.column("reason").to_pylist() if dead is not None else []):
        by_reason[reason] = by_reason.get(reason, 0) + 1
    report.update(label_rows_read=read, labels_accepted=accepted, labels_written=written, dead_letters=n_dead,
                  dead_letters_by_reason=dict(sorted(by_reason.items())))
    if args.dead_letters and dead is not None:
        with open(args.dead_letters, "w", encoding="utf-8") as fh:
            for row in dead.to_pylist():
                fh.write(json.dumps(row, default=str, sort_keys=True) + "\n")
        report["dead_letters_file"] = args.dead_letters
    print(json.dumps(report, indent=2))
    if n_dead:
        print(f"finfeat store-labels: warning: {n_dead} label row(s) rejected ({by_reason})"
              + ("" if args.dead_letters else "; --dead-letters PATH keeps them"), file=sys.stderr)
    return EXIT_OK
