"""``finfeat stream``: Kafka -> the same parse, dedup and feature code -> Delta, exactly once.

The pipeline is the backfill's, made unbounded: each poll's messages are parsed as one batch
by the batch parser (``canonical`` mapping), duplicates dropped by txn id (state per bucket
of txn ids), features computed by the unbounded ``ComputeFeatures``
(:class:`~finfeat.pipelines.streaming.ComputeFeaturesUnbounded`: bucketed entity state,
event-time timers, the same engine), and feature rows committed to the backfill's Delta
table layout in micro-batches: one Delta commit every ``--commit-every-seconds`` of
processing time (when there is something to commit), and a last one when the input ends.
Elements are Arrow tables throughout, so the per-event cost is vectorized work, not runner
overhead.

Exactly once into Delta: one committer (a stateful step on a single key) writes each
micro-batch as a Delta commit carrying an application transaction ``(app id, version)``,
versions increasing by one. delta-rs does not reject a repeated transaction by itself, so
the committer reads ``transaction_version(app_id)`` first, and drops rows whose txn id the
table already holds. A restarted job replays the topic from the start of its retention
(rebuilding the windows' state), so a kill at any point loses nothing and duplicates
nothing; the dead-letter table is written the same way, keyed by source position.

Online store (``--online-store sqlite:PATH`` or ``redis://HOST:PORT/DB``, as for the backfill):
the valid events are written as soon as they are parsed, in the bundle that read them from
Kafka, without waiting for the watermark or for the job's own de-duplication, which would cost
a shuffle and a stateful step (:class:`WriteOnlineStoreFn`). The store keeps events, not
feature rows, and its writes are idempotent per txn id (the first copy written wins) and
monotonic, so the order, repeated deliveries, a replay after a restart, or a concurrent
backfill never move a state backwards.
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam import pvalue
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp
from deltalake import DeltaTable

from finfeat import __version__
from finfeat.jobs import delta
from finfeat.jobs.kafka.source import DEFAULT_BATCH_WAIT_S
from finfeat.jobs.stream_commit import commit_micro_batch
from finfeat.pipelines.features import DEAD, ParseBatchFn
from finfeat.pipelines.streaming import (
    DEFAULT_BUCKETS,
    DEFAULT_EMIT_EVERY_MS,
    _HISTORY_CACHE,
    ComputeFeaturesUnbounded,
    apply_change,
    as_events,
    refuse_runner_splits,
)
from finfeat.pipelines.stop import STOP
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import PARTITION_COLUMN, feature_schema
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.buckets import split_by_bucket
from finfeat.transforms.spec import FeatureSpec
from finfeat.transforms.stream_steps import SeenTxnIds, decode_messages, drop_repeated, late_dead_letters

_LOG = logging.getLogger(__name__)


class DecodeMessagesFn(beam.DoFn):
    """One poll's messages -> one raw table for the batch parser; bad JSON -> ``unparseable``."""

    def __init__(self, *, topic: str, run_id: str) -> None:
        self._topic, self._run_id = topic, run_id

    def process(self, batch: tuple[int, list[tuple[int, bytes]]]) -> Iterator[object]:
        partition, messages = batch
        source = f"{self._topic}/{partition}"
        raw, dead = decode_messages(messages, source=source, run_id=self._run_id)
        if dead is not None:
            yield pvalue.TaggedOutput(DEAD, dead)
        if raw is not None:
            yield source, raw, DEAD_LETTER_SCHEMA.empty_table()


class DropRepeatedTxnFn(beam.DoFn):
    """Per bucket of txn ids: the first delivery of a txn id passes, repeats become
    ``duplicate_txn_id`` dead letters (:func:`~finfeat.transforms.stream_steps.drop_repeated`).
    """

    SEEN = BagStateSpec("seen", PickleCoder())
    TOKEN = ReadModifyWriteStateSpec("token", PickleCoder())  # names this worker's copy (see WorkerCache)

    def __init__(self, *, run_id: str, retention_us: int) -> None:
        self._run_id, self._retention = run_id, retention_us

    def setup(self) -> None:
        refuse_runner_splits()

    def process(self, kv: tuple[int, pa.Table], key=beam.DoFn.KeyParam, seen=beam.DoFn.StateParam(SEEN),
                token=beam.DoFn.StateParam(TOKEN)) -> Iterator[object]:
        ids = _HISTORY_CACHE.take("seen", key, token.read())
        if ids is None:
            ids = SeenTxnIds(seen.read())
        result = drop_repeated(kv[1], ids, run_id=self._run_id, retention_us=self._retention)
        apply_change(seen, result.change)
        fresh = uuid.uuid4().hex
        token.write(fresh)
        _HISTORY_CACHE.put("seen", key, fresh, ids)
        if result.fresh is not None:
            yield result.fresh
        if result.dead is not None:
            yield pvalue.TaggedOutput(DEAD, result.dead)


class WriteOnlineStoreFn(beam.DoFn):
    """Valid events -> the online store, in small batches per bundle, as soon as they are parsed.

    The write sits in the stage that reads Kafka (no shuffle before it), without waiting for the
    watermark or for :class:`DropRepeatedTxnFn`: the store keeps each entity's recent events
    (not feature rows) and computes features at lookup time, and its writes are idempotent per
    txn id and order-independent (monotonic), so an early write is never wrong, and a repeated
    delivery or a write repeated after a restart (the job replays the topic) changes nothing.
    The store keeps the first copy of a txn id written, the stream's de-duplication the first
    delivered: the same copy, as `finfeat produce` keys messages by card, so every copy of a
    transaction travels in one partition, in order. Late events are written too: they are real
    transactions, a lookup after them must see them, and the next backfill repairs the feature
    rows of their days in Delta (the stream reports them as ``late`` dead letters).

    One store per DoFn instance, opened in ``setup`` and closed in ``teardown``. The SDK may
    call a DoFn from different threads over its life, and the SQLite store keeps a connection
    per thread, so every store call runs on one thread owned by this instance: one connection
    per instance, whichever thread runs the bundle. A bundle's events are buffered and written
    every ``batch_events`` events and at the end of the bundle; the bundle completes only after
    its writes did. A store error is raised, never swallowed: the bundle fails and so does the
    job (a write may have been partly applied; re-running is the recovery, writes are idempotent).
    """

    def __init__(self, *, url: str, spec: FeatureSpec, batch_events: int = 2000) -> None:
        if batch_events < 1:
            raise ValueError("batch_events must be at least 1")
        self._url, self._spec, self._batch = url, spec, batch_events
        self._store = self._thread = None

    def setup(self) -> None:
        from finfeat.jobs.online import open_store

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-store")
        self._store = self._thread.submit(open_store, self._url, self._spec).result()
        self._written = beam.metrics.Metrics.counter("finfeat", "online_events_written")
        self._pending: list[pa.Table] = []
        self._rows = 0

    def start_bundle(self) -> None:
        self._pending, self._rows = [], 0

    def process(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(as_events(table))
        self._rows += table.num_rows
        if self._rows >= self._batch:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        events = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._rows = [], 0
        for start in range(0, events.num_rows, self._batch):
            chunk = events.slice(start, self._batch)
            self._thread.submit(self._store.write, chunk).result()  # raises the store's error here
            self._written.inc(chunk.num_rows)

    def teardown(self) -> None:
        if self._thread is None:
            return
        try:
            if self._store is not None:
                self._thread.submit(self._store.close).result()
        finally:
            self._thread.shutdown(wait=True)
            self._store = self._thread = None


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


def _late_dead_letter(row: dict, run_id: str) -> pa.Table:
    return late_dead_letters([row], run_id=run_id)


class CommitMicroBatchFn(beam.DoFn):
    """The single committer: buffers tables and appends them as one Delta commit with the next
    application transaction, ``every_s`` seconds (processing time) after the first buffered
    table, and once more when the input ends (the watermark reaches the end of time)."""

    BUFFER = BagStateSpec("buffer", PickleCoder())
    LAST = ReadModifyWriteStateSpec("last", VarIntCoder())
    ARMED = ReadModifyWriteStateSpec("armed", VarIntCoder())
    TICK = TimerSpec("tick", TimeDomain.REAL_TIME)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, *, path: str, app_id: str, kind: str, schema: pa.Schema, key_columns: list[str],
                 partition_by: str, metadata: dict[str, str], every_s: float,
                 match_partitions: bool = True, time_column: str | None = None) -> None:
        self._path, self._app, self._kind, self._schema = path, app_id, kind, schema
        self._time = time_column
        self._keys, self._partition, self._meta = key_columns, partition_by, metadata
        self._every, self._match_partitions = every_s, match_partitions

    def setup(self) -> None:
        refuse_runner_splits()

    def process(self, kv: tuple[int, pa.Table], buffer=beam.DoFn.StateParam(BUFFER),
                armed=beam.DoFn.StateParam(ARMED), tick=beam.DoFn.TimerParam(TICK),
                end=beam.DoFn.TimerParam(END)) -> None:
        _, table = kv
        if table.num_rows == 0:
            return
        buffer.add(table)
        if armed.read() is None:
            armed.write(1)
            # never re-armed from the timer itself: a timer that keeps itself alive keeps the job alive
            tick.set(Timestamp.now() + Duration(micros=int(self._every * 1_000_000)))
            end.set(GlobalWindow().max_timestamp())

    @on_timer(TICK)
    def on_tick(self, buffer=beam.DoFn.StateParam(BUFFER), last=beam.DoFn.StateParam(LAST),
                armed=beam.DoFn.StateParam(ARMED)) -> Iterator[dict]:
        yield from self._commit(buffer, last, armed)

    @on_timer(END)
    def on_end(self, buffer=beam.DoFn.StateParam(BUFFER), last=beam.DoFn.StateParam(LAST),
               armed=beam.DoFn.StateParam(ARMED), tick=beam.DoFn.TimerParam(TICK)) -> Iterator[dict]:
        # the input has ended: commit now, and cancel the pending processing-time timer, which
        # would otherwise keep the job alive until it fires
        tick.clear()
        yield from self._commit(buffer, last, armed)

    def _commit(self, buffer, last, armed) -> Iterator[dict]:  # noqa: ANN001
        tables = list(buffer.read())
        buffer.clear()
        armed.clear()
        done = commit_micro_batch(self._path, tables, app_id=self._app, kind=self._kind, schema=self._schema,
                                  key_columns=self._keys, partition_by=self._partition, metadata=self._meta,
                                  last_version=last.read(), match_partitions=self._match_partitions,
                                  time_column=self._time)
        if done is not None:
            last.write(done.app_version)
            yield {"table": done.table, "rows": done.rows, "app_version": done.app_version}


def build_stream(p: beam.Pipeline, *, bootstrap: str, topic: str, warehouse: Path, spec: FeatureSpec,
                 app_id: str, run_id: str, token_key: bytes, bound_s: float, commit_every_s: float,
                 stop_after_idle_s: float | None, start: str = "earliest", buckets: int = DEFAULT_BUCKETS,
                 emit_every_ms: int = DEFAULT_EMIT_EVERY_MS, poll_s: float = 0.5,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
                 online_store: str | None = None) -> None:
    """The stream job's pipeline on ``p``; ``online_store``: also write the events to this store
    (a URL as :func:`finfeat.jobs.online.open_store` takes it, e.g. from :func:`online_store_url`)."""
    from finfeat.jobs.kafka.source import ReadFromKafkaTopic

    mapping = Mapping.load("canonical")
    decoded = (p
               | "ReadKafka" >> ReadFromKafkaTopic(bootstrap=bootstrap, topic=topic, start=start, bound_s=bound_s,
                                                   stop_after_idle_s=stop_after_idle_s, poll_s=poll_s,
                                                   batch_wait_s=batch_wait_s)
               | "DecodeMessages" >> beam.ParDo(DecodeMessagesFn(topic=topic, run_id=run_id)).with_outputs(
                   DEAD, main="raw"))
    parsed = decoded.raw | "ParseEvents" >> beam.ParDo(
        ParseBatchFn(mapping=mapping, token_key=token_key, run_id=run_id, recorded_at_us=0)).with_outputs(
            DEAD, "stats", main="events")
    unique = (parsed.events
              | "BucketByTxnId" >> beam.FlatMap(split_by_bucket, "txn_id", buckets
                                                ).with_output_types(Tuple[int, pa.Table])
              | "DropRepeatedTxn" >> beam.ParDo(DropRepeatedTxnFn(run_id=run_id, retention_us=spec.max_window_us)
                                                ).with_outputs(DEAD, main="events"))
    if online_store:
        # valid events as parsed, late and repeated ones included (the store keeps the first copy of a
        # txn id), in the stage that reads Kafka: no shuffle, no wait for the watermark
        parsed.events | "WriteOnlineStore" >> beam.ParDo(WriteOnlineStoreFn(url=online_store, spec=spec))
    out = unique.events | "ComputeFeatures" >> ComputeFeaturesUnbounded(spec=spec, buckets=buckets,
                                                                        emit_every_ms=emit_every_ms)
    late = out["late"] | "LateToDeadLetters" >> beam.Map(_late_dead_letter, run_id)
    dead = (decoded[DEAD], parsed[DEAD], unique[DEAD], late) | "FlattenDeadLetters" >> beam.Flatten()
    meta = {"finfeat.run_id": run_id, "finfeat.code_version": __version__, "finfeat.spec_hash": spec.spec_hash,
            "finfeat.stream.app_id": app_id}
    for kind, pcoll, schema, keys, part, match, at in (
            ("features", out["features"], feature_schema(spec), ["txn_id"], PARTITION_COLUMN, True, "event_time"),
            # a replay records its dead letters on another day: look for them in every partition
            ("dead_letters", dead, DEAD_LETTER_SCHEMA, ["source", "source_row", "reason", "txn_id"],
             "recorded_date", False, None)):
        label = "".join(w.capitalize() for w in kind.split("_"))
        (pcoll
         | f"Key{label}" >> beam.Map(lambda t: (0, t)).with_output_types(Tuple[int, pa.Table])
         | f"Commit{label}" >> beam.ParDo(CommitMicroBatchFn(
             path=delta.table_path(warehouse, kind), app_id=f"{app_id}:{kind}", kind=kind, schema=schema,
             key_columns=keys, partition_by=part, metadata=meta, every_s=commit_every_s,
             match_partitions=match, time_column=at)))


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
                             online_store=store)
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
