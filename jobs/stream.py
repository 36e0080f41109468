"""``finfeat stream``: Kafka -> the same parse, dedup and feature code -> Delta, exactly once.

This module parses the flags and starts an engine: Beam (the default: Prism, or any ``--runner``;
the pipeline is :func:`finfeat.pipelines.stream_job.build_stream`) or Flink (``--engine flink``:
:mod:`finfeat.jobs.flink`). Both engines run the same step functions
(:mod:`finfeat.transforms.stream_steps`) and the same exactly-once Delta commit
(:mod:`finfeat.jobs.stream_commit`).

Online store (``--online-store sqlite:PATH`` or ``redis://HOST:PORT/DB``, as for the backfill):
the valid events are written as soon as they are parsed, without waiting for the watermark or
for the job's own de-duplication. The store keeps events, not feature rows, and its writes are
idempotent per txn id (the first copy written wins) and monotonic, so the order, repeated
deliveries, a replay after a restart, or a concurrent backfill never move a state backwards.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from deltalake import DeltaTable

from finfeat.jobs import delta
from finfeat.jobs.kafka.source import DEFAULT_BATCH_WAIT_S
from finfeat.jobs.online.base import WRITE_RETRY_S
from finfeat.pipelines.stop import STOP
from finfeat.pipelines.stream_job import build_stream
from finfeat.pipelines.streaming import DEFAULT_BUCKETS, DEFAULT_EMIT_EVERY_MS
from finfeat.transforms.spec import FeatureSpec

_LOG = logging.getLogger(__name__)


def online_store_url(url: str) -> str:
    """``--online-store`` as the workers open it: a relative SQLite path made absolute (workers
    may run in another directory); Redis URLs unchanged."""
    from finfeat.jobs.online import sqlite_path

    path = sqlite_path(url)
    return url if path is None else f"sqlite:{Path(path).resolve()}"


def check_online_store(url: str, spec: FeatureSpec) -> str:
    """Open the store once before the job starts (creating a SQLite file and its tables), so a
    wrong URL, an unreachable server or a store of another spec fail at once; its location."""
    from finfeat.jobs.online import open_store

    store = open_store(url, spec)
    try:
        first = next(iter(store.retention))
        store.read_states([(first, "finfeat-stream-probe")])  # reaches the server, checks the spec
        return store.location
    finally:
        store.close()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="Kafka -> features -> Delta (and the online store), exactly once",
                       description="Any flag not listed is passed to Beam; the default runner is PrismRunner "
                                   "with --prism_location from .cache/prism/bin/prism when present.",
                       allow_abbrev=False)
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--topic", default="transactions")
    p.add_argument("--warehouse", default="warehouse")
    p.add_argument("--app-id", default="finfeat-stream", help="one id per job: names its Delta transactions")
    p.add_argument("--bound-seconds", type=float, default=5.0, help="bound on out-of-orderness (watermark lag)")
    p.add_argument("--commit-every-seconds", type=float, default=60.0,
                   help="seconds (processing time) between Delta commits; the rest is committed when the input ends")
    p.add_argument("--emit-every-ms", type=int, default=DEFAULT_EMIT_EVERY_MS,
                   help="features of an event are emitted once the watermark passes the next multiple of this "
                        "(event time); larger batches more work per timer")
    p.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS,
                   help="state keys per entity kind and for txn ids (parallelism of the stateful steps)")
    p.add_argument("--stop-after-idle", type=float, help="finish after this many seconds without messages")
    p.add_argument("--batch-wait-ms", type=int, default=round(DEFAULT_BATCH_WAIT_S * 1000),
                   help="after a poll's first message, wait this long for more (default %(default)s): lower values make "
                        "the online store fresher, higher ones cost less per event")
    p.add_argument("--online-store", help="also write every valid event to the online store as it "
                                          "arrives: sqlite:PATH or redis://HOST:PORT/DB (Redis for production)")
    p.add_argument("--store-retry-seconds", type=float, default=WRITE_RETRY_S,
                   help="keep retrying an online store that cannot be reached for this long before the job "
                        "fails (default %(default)s; writes are idempotent, so a retry is safe)")
    p.add_argument("--feature-spec")
    p.add_argument("--demo-key", action="store_true")
    p.add_argument("--engine", choices=["beam", "flink"], default="beam",
                   help="beam (default: Prism or any --runner) or flink (PyFlink; `make flink` installs it)")
    from finfeat.jobs.flink.submit import add_arguments

    add_arguments(p)


def default_prism() -> Path:
    return Path(__file__).resolve().parents[1] / ".cache" / "prism" / "bin" / "prism"


def _given(args: list[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``args`` (``--x=v`` or ``--x v``), else None."""
    value = None
    for i, a in enumerate(args):
        for name in names:
            if a.startswith(name + "="):
                value = a.split("=", 1)[1]
            elif a == name and i + 1 < len(args):
                value = args[i + 1]
    return value


def stream_options(beam_args: list[str]) -> PipelineOptions:
    """The Beam options the stream job runs with: streaming, and no deadline of its own.

    Beam's portable runner uses ``--job_server_timeout`` (default 300 s) as the deadline of the
    job's state and message streams, so a job still running after it fails on the client
    (``DEADLINE_EXCEEDED``). Unless the user gives one, there is none (connecting to an
    external ``--job_endpoint`` then waits as long as it takes).
    """
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = True
    if _given(beam_args, "--job_server_timeout", "--job-server-timeout") is None:
        options.view_as(PortableOptions).job_server_timeout = None
    return options


class _StopOnSignal:
    """SIGTERM and SIGINT request a stop (:mod:`finfeat.pipelines.stop`); a second one exits now."""

    def __enter__(self) -> _StopOnSignal:
        STOP.reset()
        self._before = {}
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if STOP.requested():
            print("finfeat stream: second stop signal, exiting without draining", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        STOP.request()
        print(f"finfeat stream: {signal.Signals(signum).name} received: stopping; what is final is committed "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from contextlib import ExitStack

    from finfeat.jobs.options import beam_args as _beam_args, token_key as _token_key
    from finfeat.jobs.prism import PrismProcess

    if args.engine == "flink":
        from finfeat.jobs.flink import submit
        from finfeat.jobs.online import OnlineStoreError

        if args.online_store:  # checked here, as for Beam, before the job starts
            args.online_store = online_store_url(args.online_store)
            spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
            try:
                print(f"stream: online store {check_online_store(args.online_store, spec)}", file=sys.stderr)
            except OnlineStoreError as exc:
                print(f"finfeat stream: error: {exc}", file=sys.stderr)
                return 4
        return submit.run(args, rest, _token_key(args, demo=False))
    prism = None
    if not any(a.startswith("--runner") for a in rest):
        rest = ["--runner=PrismRunner", *rest]
        if default_prism().exists() and _given(rest, "--prism_location") is None:
            rest.append(f"--prism_location={default_prism()}")
    if (_given(rest, "--runner") or "").endswith("PrismRunner") and _given(rest, "--job_endpoint") is None:
        location = _given(rest, "--prism_location")
        if location and Path(location).is_file():  # else Beam starts (or fetches) Prism itself
            prism = location
            rest = [a for a in rest if not a.startswith("--prism_location")]
    beam_args = _beam_args(rest)
    spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    store = None
    if args.online_store:
        from finfeat.jobs.online import OnlineStoreError

        store = online_store_url(args.online_store)
        try:
            where = check_online_store(store, spec)
        except OnlineStoreError as exc:
            print(f"finfeat stream: error: {exc}", file=sys.stderr)
            return 4
        print(f"stream: online store {where}", file=sys.stderr)
    # outputs before any input is read (after the store check, so an unusable store creates nothing):
    # a file or an unwritable place fails here
    delta.check_warehouse(args.warehouse)
    run_id = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            stack.enter_context(_StopOnSignal())
            if prism is not None:
                beam_args = [*beam_args, f"--job_endpoint={stack.enter_context(PrismProcess(prism))}"]
            options = stream_options(beam_args)
            with beam.Pipeline(options=options) as p:
                build_stream(p, bootstrap=args.bootstrap, topic=args.topic, warehouse=Path(args.warehouse),
                             spec=spec, app_id=args.app_id, run_id=run_id, token_key=_token_key(args, demo=False),
                             bound_s=args.bound_seconds, commit_every_s=args.commit_every_seconds,
                             stop_after_idle_s=args.stop_after_idle, buckets=args.buckets,
                             emit_every_ms=args.emit_every_ms, batch_wait_s=args.batch_wait_ms / 1000,
                             online_store=store, store_retry_s=args.store_retry_seconds)
    except RuntimeError as exc:
        # the runner's message holds the worker's traceback (logged above); name the cause in one line
        cause = next((line.strip() for line in str(exc).splitlines()
                      if "finfeat.jobs.online" in line and "online store" in line), None)
        if cause is None:
            raise
        print(f"finfeat stream: error: the online store failed and the job stopped ({cause}); Delta commits "
              "made so far stand, and a restart replays the topic (store writes are idempotent)", file=sys.stderr)
        return 1
    features = delta.table_path(args.warehouse, delta.FEATURES)
    rows = delta.read_table(features, columns=["txn_id"]).num_rows if DeltaTable.is_deltatable(features) else 0
    how = "stopped on request" if STOP.requested() else "finished"
    print(f"stream {run_id} {how} after {time.monotonic() - started:.1f} s: {rows:,} feature rows in {features}")
    return 0
