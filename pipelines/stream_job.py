"""The stream job on Beam: Kafka -> the same parse, dedup and feature code -> Delta, exactly once.

Beam's adapter of the stream steps (:mod:`finfeat.transforms.stream_steps`, shared with the
Flink job in :mod:`finfeat.jobs.flink.stream_job`): the DoFns here only move state and
elements; ``finfeat stream`` (:mod:`finfeat.jobs.stream`) parses the flags and calls
:func:`build_stream`.

The pipeline is the backfill's, made unbounded: each poll's messages are parsed as one batch
by the batch parser (``canonical`` mapping), duplicates dropped by txn id (state per bucket
of txn ids), features computed by the unbounded ``ComputeFeatures``
(:class:`~finfeat.pipelines.streaming.ComputeFeaturesUnbounded`: bucketed entity state,
event-time timers, the same engine), and feature rows committed to the backfill's Delta
table layout in micro-batches: one Delta commit every ``commit_every_s`` of processing time
(when there is something to commit), and a last one when the input ends. Elements are Arrow
tables throughout, so the per-event cost is vectorized work, not runner overhead.

Exactly once into Delta: one committer (a stateful step on a single key) writes each
micro-batch as a Delta commit carrying an application transaction ``(app id, version)``,
versions increasing by one (:func:`finfeat.jobs.stream_commit.commit_micro_batch`). A restarted
job replays the topic from the start of its retention (rebuilding the windows' state), so a kill
at any point loses nothing and duplicates nothing; the dead-letter table is written the same
way, keyed by source position.

Online store: the valid events are written as soon as they are parsed, in the bundle that read
them from Kafka (:class:`WriteOnlineStoreFn`); the store keeps events, not feature rows, and its
writes are idempotent per txn id and monotonic.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam import pvalue
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp

from finfeat import __version__
from finfeat.jobs import delta
from finfeat.jobs.kafka.source import DEFAULT_BATCH_WAIT_S
from finfeat.jobs.online.base import WRITE_RETRY_S, write_retrying
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
    TOKEN = ReadModifyWriteStateSpec("token", PickleCoder())  # names this worker's copy (see WorkerCopies)

    def __init__(self, *, run_id: str, retention_us: int) -> None:
        self._run_id, self._retention = run_id, retention_us

    def setup(self) -> None:
        refuse_runner_splits()

    def process(self, kv: tuple[int, pa.Table], key=beam.DoFn.KeyParam, seen=beam.DoFn.StateParam(SEEN),
                token=beam.DoFn.StateParam(TOKEN)) -> Iterator[object]:
        ids = _HISTORY_CACHE.take(("seen", key), token.read())
        if ids is None:
            ids = SeenTxnIds(seen.read())
        result = drop_repeated(kv[1], ids, run_id=self._run_id, retention_us=self._retention)
        apply_change(seen, result.change)
        fresh = uuid.uuid4().hex
        token.write(fresh)
        _HISTORY_CACHE.put(("seen", key), fresh, ids)
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
    its writes did. A store it cannot reach (a restart, a stall under load) is retried with backoff
    for up to ``retry_s`` seconds (``--store-retry-seconds``; writes are idempotent, so a batch
    applied before its answer was lost is applied again with no change); then, or at once for any
    other store error, the error is raised, never swallowed: the bundle fails and so does the job.
    """

    def __init__(self, *, url: str, spec: FeatureSpec, batch_events: int = 2000,
                 retry_s: float = WRITE_RETRY_S) -> None:
        if batch_events < 1:
            raise ValueError("batch_events must be at least 1")
        self._url, self._spec, self._batch, self._retry_s = url, spec, batch_events, retry_s
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
            # a store it cannot reach is retried for a while (writes are idempotent); its error raises here
            self._thread.submit(write_retrying, self._store, chunk, within_s=self._retry_s).result()
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
                 online_store: str | None = None, store_retry_s: float = WRITE_RETRY_S) -> None:
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
        parsed.events | "WriteOnlineStore" >> beam.ParDo(WriteOnlineStoreFn(url=online_store, spec=spec,
                                                                            retry_s=store_retry_s))
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
