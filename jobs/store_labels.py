"""``finfeat store-labels``: write labels (chargebacks, confirmed fraud) to the online store.

The store then serves label-aware features (``merchant_fraud_rate_*``) with these labels, as the
backfill computes them with the same feed: per transaction the latest label time wins, a label
counts only once known. Two inputs:

* ``--labels FILE``: labels files, read and checked as ``finfeat backfill --labels`` reads them
  (columns ``txn_id``, ``is_fraud``, ``label_time``; CSV, JSON Lines or Parquet). Writing the same
  file again changes nothing.
* ``--topic T`` (with ``--bootstrap``): ``finfeat.label.v1`` messages of a Kafka topic (``finfeat
  produce --labels``), consumed in batches as member of a consumer group until stopped (SIGTERM or
  Ctrl-C finish the current batch; ``--stop-after-idle S``: after S seconds without messages). A
  batch's offsets are committed only after its labels and dead letters are written: at least
  once, and exact (label writes are idempotent and order-independent), also after a kill.

Bad rows and messages are dead letters with a reason (``--dead-letters PATH`` as JSON Lines: a
file run rewrites it, a topic run appends to it, each message's once; ``--warehouse DIR``: the
Delta table DIR/dead_letters), and ``read = labels accepted + dead letters`` is checked.

Exit codes: 0 written (dead letters, if any, are reported); 2 usage or configuration error (a
bad flag or file, a missing topic, a spec without label-aware features, a store written for
another spec); 4 the store or the broker is unavailable (a topic run: the failed batch is not
committed, a restart reads it again).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from pathlib import Path

_LOG = logging.getLogger(__name__)
EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 4
_BATCH = 5_000


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "store-labels", help="write labels (files or a Kafka topic) to the online store, for label-aware features",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--store", required=True, help="sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="Redis key namespace (default ff:v1)")
    p.add_argument("--labels", action="append", default=[], metavar="FILE",
                   help="a labels file (txn_id, is_fraud, label_time); repeatable")
    p.add_argument("--topic", help="consume finfeat.label.v1 messages from this Kafka topic instead of files")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers (with --topic)")
    p.add_argument("--group", help="Kafka consumer group (default finfeat-store-labels-TOPIC): its committed "
                                   "offsets say where a restart goes on")
    p.add_argument("--stop-after-idle", type=float, metavar="S",
                   help="with --topic: finish after S seconds without messages (default: run until stopped)")
    p.add_argument("--max-batch", type=int, default=5_000, metavar="N",
                   help="with --topic: at most N messages per batch (one store write, one offset commit)")
    p.add_argument("--feature-spec", help="feature spec YAML with label-aware features (default: the built-in "
                                          "v1 set, which has none)")
    p.add_argument("--dead-letters", metavar="PATH", help="also write the rejected rows here, as JSON Lines")
    p.add_argument("--warehouse", metavar="DIR", help="also append the rejected rows to the Delta table "
                                                      "DIR/dead_letters")
    return p


def _usage(message: object) -> int:
    print(f"finfeat store-labels: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags (and how to fix it), or None."""
    kafka_only = [f for f, v in (("--bootstrap", args.bootstrap), ("--group", args.group),
                                 ("--stop-after-idle", args.stop_after_idle)) if v is not None]
    if args.labels and args.topic:
        return "--labels and --topic are two inputs: pass one of them (one command per input)"
    if not args.labels and not args.topic:
        return "nothing to read: pass --labels FILE or --topic T --bootstrap HOST:PORT"
    if args.labels and kafka_only:
        return f"{', '.join(kafka_only)} go with --topic, not with --labels files"
    if args.topic and not args.bootstrap:
        return "--topic needs --bootstrap HOST:PORT (the Kafka brokers)"
    if args.max_batch < 1:
        return "--max-batch must be at least 1"
    if args.stop_after_idle is not None and args.stop_after_idle < 0:
        return "--stop-after-idle must not be negative"
    if args.warehouse and Path(args.warehouse).exists() and not Path(args.warehouse).is_dir():
        return f"--warehouse {args.warehouse} is a file; pass a folder"
    if args.dead_letters and Path(args.dead_letters).is_dir():
        return f"--dead-letters {args.dead_letters} is a folder; pass a file name"
    return None


def run(args: argparse.Namespace) -> int:
    from finfeat.jobs.online import StoreUnavailable, open_store
    from finfeat.transforms.spec import FeatureSpec, SpecError

    problem = _check_flags(args)
    if problem:
        return _usage(problem)
    try:
        spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    except SpecError as exc:
        return _usage(exc)
    if not spec.needs_labels:
        return _usage("the feature spec has no label-aware feature (such as merchant fraud_rate), so the store keeps "
                      "no labels; pass the --feature-spec the store was materialized with")
    files = [Path(f) for f in args.labels]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return _usage(f"labels file(s) {', '.join(missing)} do not exist")
    run_id = uuid.uuid4().hex
    try:
        store = open_store(args.store, spec, create=False, namespace=args.namespace)
    except ValueError as exc:
        return _usage(exc)
    except StoreUnavailable as exc:
        print(f"finfeat store-labels: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    with store:
        if args.topic:
            return _run_topic(args, store, spec, run_id)
        return _run_files(args, store, spec, files, run_id)


def _warehouse_sink(args: argparse.Namespace, spec: object, run_id: str, app_id: str) -> object | None:
    from finfeat import __version__
    from finfeat.jobs.kafka.label_consumer import DeltaDeadLetters

    if not args.warehouse:
        return None
    return DeltaDeadLetters(args.warehouse, app_id=app_id, metadata={
        "finfeat.run_id": run_id, "finfeat.code_version": __version__, "finfeat.spec_hash": spec.spec_hash})


def _by_reason(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def _warn_dead(n_dead: int, by_reason: dict[str, int], args: argparse.Namespace) -> None:
    if n_dead:
        kept = args.dead_letters or args.warehouse
        print(f"finfeat store-labels: warning: {n_dead} label row(s) rejected ({by_reason})"
              + ("" if kept else "; --dead-letters PATH or --warehouse DIR keeps them"), file=sys.stderr)


def _run_files(args: argparse.Namespace, store: object, spec: object, files: list[Path], run_id: str) -> int:
    import pyarrow as pa

    from finfeat.jobs.online import OnlineStoreError, StoreSpecMismatch, StoreUnavailable
    from finfeat.jobs.online.base import wall_clock_us
    from finfeat.jobs.sources import read_labels_file
    from finfeat.schemas.mapping import MappingError
    from finfeat.transforms.labels import parse_labels

    try:
        sink = _warehouse_sink(args, spec, run_id, "store-labels:files:dead_letters")
    except ValueError as exc:
        return _usage(exc)
    recorded = wall_clock_us()
    report: dict[str, object] = {"store": args.store, "files": [str(f) for f in files]}
    read = accepted = written = 0
    dead_parts: list[pa.Table] = []
    try:
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
        return _usage(exc)
    except StoreUnavailable as exc:
        print(f"finfeat store-labels: {exc} (writes are idempotent: run it again)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except OnlineStoreError as exc:
        print(f"finfeat store-labels: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    dead = pa.concat_tables(dead_parts) if dead_parts else None
    n_dead = dead.num_rows if dead is not None else 0
    if read != accepted + n_dead:  # a bug, never expected
        return _usage(f"label rows read {read} != labels accepted {accepted} + dead letters {n_dead}")
    by_reason = _by_reason(dead.column("reason").to_pylist() if dead is not None else [])
    report.update(label_rows_read=read, labels_accepted=accepted, labels_written=written, dead_letters=n_dead,
                  dead_letters_by_reason=by_reason)
    if args.dead_letters and dead is not None:
        with open(args.dead_letters, "w", encoding="utf-8") as fh:
            for row in dead.to_pylist():
                fh.write(json.dumps(row, default=str, sort_keys=True) + "\n")
        report["dead_letters_file"] = args.dead_letters
    if sink is not None and dead is not None:
        report["dead_letters_new_in_warehouse"] = sink.write(dead)
    print(json.dumps(report, indent=2))
    _warn_dead(n_dead, by_reason, args)
    return EXIT_OK


class _StopOnSignal:
    """SIGTERM and SIGINT set ``stop`` (the consumer finishes its batch); a second one exits now."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._before: dict[int, object] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self._stop.is_set():
            print("finfeat store-labels: second stop signal, exiting now (the batch in flight is read again "
                  "on restart)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self._stop.set()
        print(f"finfeat store-labels: {signal.Signals(signum).name} received: finishing the current batch",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


def _run_topic(args: argparse.Namespace, store: object, spec: object, run_id: str) -> int:
    from dataclasses import asdict

    from finfeat.jobs.kafka.label_consumer import (
        JsonlDeadLetters,
        LabelConsumerError,
        TopicNotFound,
        consume_labels,
    )
    from finfeat.jobs.online import OnlineStoreError, StoreSpecMismatch, StoreUnavailable

    group = args.group or f"finfeat-store-labels-{args.topic}"
    sinks = []
    try:
        if args.dead_letters:
            sinks.append(JsonlDeadLetters(args.dead_letters))
        warehouse = _warehouse_sink(args, spec, run_id, f"store-labels:{group}:dead_letters")
    except ValueError as exc:
        return _usage(exc)
    if warehouse is not None:
        sinks.append(warehouse)
    stop = threading.Event()
    try:
        with _StopOnSignal(stop):
            got = consume_labels(store, bootstrap=args.bootstrap, topic=args.topic, group=group, sinks=sinks,
                                 run_id=run_id, max_batch=args.max_batch, stop_after_idle_s=args.stop_after_idle,
                                 stop=stop)
    except TopicNotFound as exc:
        return _usage(exc)
    except StoreSpecMismatch as exc:
        return _usage(exc)
    except (StoreUnavailable, OnlineStoreError) as exc:
        print(f"finfeat store-labels: {exc}; the failed batch's offsets are not committed: run it again to read "
              "it again (label writes are idempotent)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except LabelConsumerError as exc:
        print(f"finfeat store-labels: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    report = {"store": args.store, "topic": args.topic, "bootstrap": args.bootstrap, "group": group, **asdict(got)}
    if args.dead_letters:
        report["dead_letters_file"] = args.dead_letters
    if not got.reconciles():  # a bug, never expected
        return _usage(f"messages read {got.messages_read} != labels accepted {got.labels_accepted} + dead letters "
                      f"{got.dead_letters}")
    print(json.dumps(report, indent=2))
    _warn_dead(got.dead_letters, got.dead_letters_by_reason, args)
    return EXIT_OK
