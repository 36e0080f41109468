"""The stream job on Apache Flink (PyFlink): Kafka -> parse, dedup, features -> Delta, exactly once.

    python -m finfeat.jobs.flink.stream_job --bootstrap HOST:PORT --topic T --warehouse W ...
    flink run -m HOST:PORT -pyexec PY -py stream_job.py -- --bootstrap ...

Normally started by ``finfeat stream --engine flink``. Runs in the Flink virtualenv. Without
``--flink-master`` the job runs on an embedded mini cluster in this process; with it (or under
``flink run``) it is submitted to that cluster. The steps are the Beam job's, as plain functions
(:mod:`finfeat.transforms.stream_steps`, :func:`finfeat.jobs.stream_commit.commit_micro_batch`);
the functions here only move state in and out of Flink's keyed state.

Graph (every shuffle keyed, every record a tuple of plain values and Arrow IPC bytes):

* ``ReadKafka``: Flink's Kafka connector (SQL table, ``raw`` format: value, partition, offset),
  event time from the message's ``event_time``, watermarks ``--bound-seconds`` behind (no idle
  timeout with ``--stop-after-idle``, see :func:`source_ddl`); the offsets live in Flink's checkpoints.
* ``ParseEvents`` (key: Kafka partition): messages wait in state until the watermark passes
  their tick (``--emit-every-ms``), then one batch is decoded and parsed; dead letters aside.
* ``WriteOnlineStore`` (key: Kafka partition, with ``--online-store``): batches of messages
  ``--batch-wait-ms`` apart (processing time), parsed and written without waiting for the watermark.
* ``DropRepeatedTxn`` (key: bucket of txn ids): the first delivery of a txn id passes.
* ``AccumulateInEventTime`` (key: entity kind and bucket): pending events, history, horizon;
  an event-time timer per tick releases the final events to the engine.
* ``JoinOnTxnId`` (key: bucket of txn ids): complete feature rows, late events reported once.
* ``CommitToDelta`` (key: table): a micro-batch commit every ``--commit-every-seconds`` and when
  the input ends; a restart from a checkpoint recomputes what came after it, and the commit
  drops rows the table already holds, so every row lands exactly once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
from pyflink.common import Configuration, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, StreamExecutionEnvironment
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from finfeat import __version__
from finfeat.jobs import delta
from finfeat.jobs.flink import env as flink_env
from finfeat.jobs.online.base import WRITE_RETRY_S, OnlineStoreError, write_retrying
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import PARTITION_COLUMN, feature_schema
from finfeat.transforms import stream_steps as steps
from finfeat.transforms.buckets import split_by_bucket
from finfeat.transforms.spec import ENTITY_COLUMNS, FeatureSpec

_LOG = logging.getLogger(__name__)
DEFAULT_CHECKPOINT_INTERVAL_MS = 5000
_MAX_TIMESTAMP_MS = 2**63 - 1
_BYTES = Types.PICKLED_BYTE_ARRAY()
DEAD = OutputTag("dead", _BYTES)
FEATURES_TABLE, DEAD_TABLE = delta.FEATURES, "dead_letters"


def _ipc(table: pa.Table) -> bytes:
    return steps.table_to_bytes(table)


def _table(data: bytes) -> pa.Table:
    return steps.table_from_bytes(data)


class ParseEventsFn(KeyedProcessFunction):
    """Per Kafka partition: messages wait for the watermark to pass their tick, then one batch is
    decoded and parsed (``decode_messages``, ``parse_batch``). Out: ``(txn bucket, events)``;
    dead letters to :data:`DEAD`."""

    def __init__(self, *, topic: str, run_id: str, token_key: bytes, tick_ms: int, buckets: int) -> None:
        self._topic, self._run_id, self._key, self._tick = topic, run_id, token_key, tick_ms
        self._buckets = buckets

    def open(self, ctx) -> None:  # noqa: ANN001
        from finfeat.schemas.mapping import Mapping
        from finfeat.transforms.parse import CardTokenizer

        self._pending = ctx.get_list_state(ListStateDescriptor("pending", _BYTES))
        self._mapping, self._tokenizer = Mapping.load("canonical"), CardTokenizer(self._key)
        self._read = ctx.get_metrics_group().counter("finfeat_messages_read")

    def process_element(self, row, ctx):  # noqa: ANN001, ANN201
        t = ctx.timestamp()
        self._pending.add((int(row[2]), bytes(row[0]) if row[0] is not None else None, t))
        ctx.timer_service().register_event_time_timer((t // self._tick + 1) * self._tick)
        self._read.inc()
        return iter(())

    def on_timer(self, timestamp: int, ctx):  # noqa: ANN001, ANN201
        from finfeat.transforms.parse import parse_batch

        held = list(self._pending.get() or [])
        # the end of input fires every timer in turn: take all at once, so that the steps after this
        # (which see these outputs after the last watermark, see _input_ended) get one batch
        until = _MAX_TIMESTAMP_MS if _input_ended(ctx) else timestamp
        ready = [(o, v) for o, v, t in held if t < until]
        if not ready:
            return
        self._pending.update([h for h in held if h[2] >= until])
        source = f"{self._topic}/{ctx.get_current_key()}"
        raw, dead = steps.decode_messages(sorted(ready, key=lambda m: m[0]), source=source, run_id=self._run_id)
        if dead is not None:
            yield DEAD, _ipc(dead)
        if raw is None:
            return
        events, bad = parse_batch(raw, mapping=self._mapping, tokenizer=self._tokenizer, source=source,
                                  run_id=self._run_id, recorded_at_us=0)
        if bad.num_rows:
            yield DEAD, _ipc(bad)
        if events.num_rows == 0:
            return
        for bucket, piece in split_by_bucket(events, "txn_id", self._buckets):
            yield bucket, _ipc(piece)


class WriteOnlineStoreFn(KeyedProcessFunction):
    """Per Kafka partition: the valid events to the online store, ``wait_ms`` (processing time)
    after the first message of a batch, without waiting for the watermark; the rest when the
    input ends. The store's writes are idempotent per txn id and monotonic, so repeated and late
    deliveries, and a batch written again after a restart from a checkpoint, change nothing
    (the Beam job's ``WriteOnlineStoreFn`` does the same). Unparseable messages are the feature
    path's dead letters; here they are skipped. An unreachable store is retried for ``retry_s``
    (``--store-retry-seconds``), as in the Beam job. A store error is written to ``failure_path``
    (which the driver watches: it cancels the job and exits 1, as the Beam job does, instead of
    Flink restarting the task forever) and fails the task."""

    def __init__(self, *, url: str, spec: FeatureSpec, token_key: bytes, topic: str, run_id: str,
                 wait_ms: int, failure_path: str | None = None, retry_s: float = WRITE_RETRY_S) -> None:
        self._url, self._spec, self._key, self._topic, self._run_id = url, spec, token_key, topic, run_id
        self._wait = max(1, wait_ms)
        self._failure_path, self._retry_s = failure_path, retry_s

    def _failed(self, exc: Exception) -> None:
        if self._failure_path:
            path = Path(self._failure_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{type(exc).__name__}: {exc}")

    def open(self, ctx) -> None:  # noqa: ANN001
        from finfeat.jobs.online import open_store
        from finfeat.schemas.mapping import Mapping
        from finfeat.transforms.parse import CardTokenizer

        self._pending = ctx.get_list_state(ListStateDescriptor("pending", _BYTES))
        self._armed = ctx.get_state(ValueStateDescriptor("armed", Types.BOOLEAN()))
        self._mapping, self._tokenizer = Mapping.load("canonical"), CardTokenizer(self._key)
        self._store = None
        try:
            self._store = open_store(self._url, self._spec)
        except OnlineStoreError as exc:
            self._failed(exc)
            raise
        self._written = ctx.get_metrics_group().counter("finfeat_online_events_written")

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def process_element(self, row, ctx):  # noqa: ANN001, ANN201
        self._pending.add((int(row[2]), bytes(row[0]) if row[0] is not None else None))
        if not self._armed.value():
            self._armed.update(True)
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time() + self._wait)
            timers.register_event_time_timer(_MAX_TIMESTAMP_MS)  # the input's end: write what is left
        return iter(())

    def on_timer(self, timestamp: int, ctx):  # noqa: ANN001, ANN201
        from finfeat.transforms.parse import parse_batch

        held = list(self._pending.get() or [])
        self._pending.clear()
        self._armed.clear()
        if not held:  # the end-of-input timer after a processing-time one wrote everything
            return iter(())
        source = f"{self._topic}/{ctx.get_current_key()}"
        raw, _ = steps.decode_messages(held, source=source, run_id=self._run_id)
        if raw is not None:
            events, _ = parse_batch(raw, mapping=self._mapping, tokenizer=self._tokenizer, source=source,
                                    run_id=self._run_id, recorded_at_us=0)
            if events.num_rows:
                try:  # an unreachable store is retried for retry_s (writes are idempotent)
                    write_retrying(self._store, steps.as_events(events), within_s=self._retry_s)
                except OnlineStoreError as exc:
                    self._failed(exc)
                    raise
                self._written.inc(events.num_rows)
        return iter(())


class DropRepeatedTxnFn(KeyedProcessFunction):
    """Per bucket of txn ids: first deliveries pass (``drop_repeated``), split by entity bucket.
    Out: ``("entity/bucket", events)``; ``duplicate_txn_id`` dead letters to :data:`DEAD`."""

    def __init__(self, *, run_id: str, spec: FeatureSpec, buckets: int) -> None:
        self._run_id, self._spec, self._buckets = run_id, spec, buckets

    def open(self, ctx) -> None:  # noqa: ANN001
        self._seen = ctx.get_list_state(ListStateDescriptor("seen", _BYTES))
        self._token = ctx.get_state(ValueStateDescriptor("seen-token", Types.STRING()))
        self._copies = steps.WorkerCopies()

    def process_element(self, element, ctx):  # noqa: ANN001, ANN201
        key = ctx.get_current_key()
        seen = self._copies.take(key, self._token.value())
        if seen is None:
            seen = steps.SeenTxnIds(_table(b) for b in (self._seen.get() or []))
        out = steps.drop_repeated(_table(element[1]), seen, run_id=self._run_id,
                                  retention_us=self._spec.max_window_us)
        token = self._token.value()
        if out.change is not None:
            _apply(self._seen, out.change)
            token = uuid.uuid4().hex
            self._token.update(token)
        if token is not None:
            self._copies.put(key, token, seen)
        if out.dead is not None:
            yield DEAD, _ipc(out.dead)
        if out.fresh is None:
            return
        events = steps.as_events(out.fresh)
        for entity in self._spec.entities:
            for bucket, piece in split_by_bucket(events, ENTITY_COLUMNS[entity], self._buckets):
                yield f"{entity}/{bucket}", _ipc(piece)


class EntityFeaturesFn(KeyedProcessFunction):
    """Per entity kind and bucket: events wait until the watermark passes their tick, then
    ``flush_bucket`` computes their features on them plus the bucket's history. Out:
    ``(txn bucket, pickled part)`` for the join: features, or a late marker per late event."""

    def __init__(self, *, spec: FeatureSpec, buckets: int, tick_ms: int) -> None:
        self._spec, self._buckets, self._tick_us = spec, buckets, tick_ms * 1000
        entities = list(spec.entities)
        self._steps = {e: steps.EntityStep(spec, e, i == 0) for i, e in enumerate(entities)}

    def open(self, ctx) -> None:  # noqa: ANN001
        self._pending = ctx.get_list_state(ListStateDescriptor("pending", _BYTES))
        self._history = ctx.get_list_state(ListStateDescriptor("history", _BYTES))
        self._horizon = ctx.get_state(ValueStateDescriptor("horizon", Types.LONG()))
        self._ended = ctx.get_state(ValueStateDescriptor("ended", Types.BOOLEAN()))
        # (rows the history's last rewrite kept out of reach, token of the worker's copy)
        self._shape = ctx.get_state(ValueStateDescriptor("history-shape", _BYTES))
        self._copies = steps.WorkerCopies()

    def _to_join(self, entity: str, kind: str, table: pa.Table):  # noqa: ANN202
        for bucket, piece in split_by_bucket(table, "txn_id", self._buckets):
            yield bucket, (entity, kind, _ipc(piece))

    def process_element(self, element, ctx):  # noqa: ANN001, ANN201
        entity = element[0].split("/")[0]
        on_time, late = steps.split_late(_table(element[1]), self._horizon.value())
        if late is not None:
            yield from self._to_join(entity, steps.LATE, late)
        if on_time is None:
            return
        self._pending.add(_ipc(on_time))
        if self._ended.value() or _input_ended(ctx):  # no timer fires any more: what came is final now
            yield from self._flush(ctx.get_current_key(), int(steps.event_times_us(on_time).max()))
            return
        ctx.timer_service().register_event_time_timer(_MAX_TIMESTAMP_MS)  # marks the input's end
        for due_us in steps.flush_times_us(steps.event_times_us(on_time), self._tick_us):
            ctx.timer_service().register_event_time_timer(due_us // 1000)

    def on_timer(self, timestamp: int, ctx):  # noqa: ANN001, ANN201
        key = ctx.get_current_key()
        if timestamp >= _MAX_TIMESTAMP_MS:
            self._ended.update(True)
            pending = steps.concat(_table(b) for b in (self._pending.get() or []))
            if pending is not None:
                yield from self._flush(key, int(steps.event_times_us(pending).max()))
            return
        yield from self._flush(key, steps.cutoff_of_timer_us(timestamp * 1000))

    def _flush(self, key: str, cutoff: int):  # noqa: ANN202
        entity = key.split("/")[0]
        step = self._steps[entity]
        pending = steps.concat(_table(b) for b in (self._pending.get() or []))
        if pending is None or not (steps.event_times_us(pending) <= cutoff).any():
            return  # released by an earlier timer: no need to touch the history
        kept_tails, token = self._shape.value() or (0, None)
        history = self._copies.take(key, token)
        if history is None:
            history = steps.EntityHistory.from_pieces((_table(b) for b in (self._history.get() or [])), entity)
            if history is not None:
                history.kept_tails = kept_tails
        flushed = steps.flush_bucket(pending, history, cutoff, step=step)
        if flushed is None:
            return
        yield from self._to_join(entity, steps.FEATURES, flushed.part)
        _apply(self._history, flushed.change)
        token = uuid.uuid4().hex
        self._shape.update((flushed.history.kept_tails, token))
        self._copies.put(key, token, flushed.history)
        self._pending.update([_ipc(flushed.later)] if flushed.later is not None else [])
        done = self._horizon.value()
        self._horizon.update(cutoff if done is None else max(done, cutoff))


class JoinPartsFn(KeyedProcessFunction):
    """Per bucket of txn ids: ``join_parts``. Out: ``(table name, rows)`` for the committer."""

    def __init__(self, *, spec: FeatureSpec, run_id: str) -> None:
        self._spec, self._run_id = spec, run_id
        self._entities = list(spec.entities)

    def open(self, ctx) -> None:  # noqa: ANN001
        self._parts = ctx.get_list_state(ListStateDescriptor("parts", _BYTES))
        self._schema = feature_schema(self._spec)

    def process_element(self, element, ctx):  # noqa: ANN001, ANN201
        held = [(e, k, _table(b)) for e, k, b in (self._parts.get() or [])]
        entity, kind, data = element[1]
        joined = steps.join_parts([*held, (entity, kind, _table(data))], self._entities, self._schema)
        self._parts.update([(e, k, _ipc(t)) for e, k, t in joined.keep])
        if joined.rows is not None and joined.rows.num_rows:
            yield FEATURES_TABLE, _ipc(joined.rows)
        if joined.late:
            yield DEAD_TABLE, _ipc(steps.late_dead_letters(joined.late, run_id=self._run_id))


class CommitToDeltaFn(KeyedProcessFunction):
    """Per table: buffers rows and commits them with ``commit_micro_batch`` every ``every_s``
    seconds (processing time) after the first buffered batch, and when the input ends."""

    def __init__(self, *, warehouse: str, app_id: str, spec: FeatureSpec, run_id: str, every_s: float) -> None:
        self._warehouse, self._app, self._every_ms = warehouse, app_id, int(every_s * 1000)
        self._meta = {"finfeat.run_id": run_id, "finfeat.code_version": __version__,
                      "finfeat.spec_hash": spec.spec_hash, "finfeat.stream.app_id": app_id,
                      "finfeat.stream.engine": "flink"}
        self._spec = spec

    def open(self, ctx) -> None:  # noqa: ANN001
        self._buffer = ctx.get_list_state(ListStateDescriptor("buffer", _BYTES))
        self._last = ctx.get_state(ValueStateDescriptor("last", Types.LONG()))
        self._armed = ctx.get_state(ValueStateDescriptor("armed", Types.BOOLEAN()))
        self._ended = ctx.get_state(ValueStateDescriptor("ended", Types.BOOLEAN()))

    def process_element(self, element, ctx):  # noqa: ANN001, ANN201
        self._buffer.add(element[1])
        if self._ended.value() or _input_ended(ctx):  # no timer fires any more: commit now
            return self.on_timer(_MAX_TIMESTAMP_MS, ctx)
        if not self._armed.value():
            self._armed.update(True)
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time() + self._every_ms)
            timers.register_event_time_timer(_MAX_TIMESTAMP_MS)
        return iter(())

    def on_timer(self, timestamp: int, ctx):  # noqa: ANN001, ANN201
        from finfeat.jobs.stream_commit import commit_micro_batch

        if timestamp >= _MAX_TIMESTAMP_MS:
            self._ended.update(True)
        tables = [_table(b) for b in (self._buffer.get() or [])]
        self._buffer.clear()
        self._armed.clear()
        kind = ctx.get_current_key()
        if kind == FEATURES_TABLE:
            schema, keys, part, match = feature_schema(self._spec), ["txn_id"], PARTITION_COLUMN, True
        else:  # a replay records its dead letters on another day: look for them in every partition
            schema, keys, part, match = (DEAD_LETTER_SCHEMA, ["source", "source_row", "reason", "txn_id"],
                                         "recorded_date", False)
        done = commit_micro_batch(delta.table_path(self._warehouse, kind), tables, app_id=f"{self._app}:{kind}",
                                  kind=kind, schema=schema, key_columns=keys, partition_by=part,
                                  metadata=self._meta, last_version=self._last.value(), match_partitions=match)
        if done is not None:
            self._last.update(done.app_version)
        return iter(())


def _input_ended(ctx) -> bool:  # noqa: ANN001
    """The watermark is at the end of time (the input ended, or a drain). PyFlink emits the output
    of the timers that this last watermark fires after the watermark itself, so a downstream step
    can receive elements once its own timers have all fired: it must finish their work at once.
    The steps also keep an ``ended`` flag, set by a timer at the end of time, for the same purpose."""
    return ctx.timer_service().current_watermark() >= _MAX_TIMESTAMP_MS


def _apply(state, change: steps.StateChange) -> None:  # noqa: ANN001
    if change.reset:
        state.update([_ipc(t) for t in change.add])
    else:
        for t in change.add:
            state.add(_ipc(t))


def _day_to_second(ms: int) -> str:
    s, ms = divmod(ms, 1000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d} {h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def source_ddl(*, bootstrap: str, topic: str, group_id: str, bound_s: float, start: str = "earliest",
               idle_timeout: bool = True) -> str:
    """The Kafka table: raw value, partition and offset; event time from the message and
    watermarks ``bound_s`` behind the newest. A message without a readable event time gets the
    epoch, which never moves the watermark (a malformed message must not make later events late);
    the parse step dead-letters it at the next watermark, or reads its event time its own way.

    ``idle_timeout``: a partition without messages for ``max(1 s, bound)`` stops holding the
    watermark back. Off for a job that ends with a drain: once every partition is idle the source
    is idle, and Flink drops the end-of-time watermark that a stop with drain sends from an idle
    source, so no event-time timer fires and the events still waiting for the watermark are lost."""
    bound_ms = max(0, round(bound_s * 1000))
    idle = f",\n  'scan.watermark.idle-timeout' = '{max(1000, bound_ms)} ms'" if idle_timeout else ""
    event_time = "JSON_VALUE(CAST(`value` AS STRING), '$.event_time')"
    formats = ["yyyy-MM-dd''T''HH:mm:ss.SSSSSS''Z''", "yyyy-MM-dd''T''HH:mm:ss''Z''"]
    parsed = ", ".join(f"TO_TIMESTAMP({event_time}, '{f}')" for f in formats)
    mode = {"earliest": "earliest-offset", "latest": "latest-offset"}[start]
    return f"""
CREATE TEMPORARY TABLE kafka_messages (
  `value` BYTES,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  `event_time` AS COALESCE({parsed}, TIMESTAMP '1970-01-01 00:00:00.000'),
  WATERMARK FOR `event_time` AS `event_time` - INTERVAL '{_day_to_second(bound_ms)}' DAY TO SECOND(3)
) WITH (
  'connector' = 'kafka', 'topic' = '{topic}', 'properties.bootstrap.servers' = '{bootstrap}',
  'properties.group.id' = '{group_id}', 'scan.startup.mode' = '{mode}', 'format' = 'raw'{idle}
)"""


def build(env: StreamExecutionEnvironment, *, bootstrap: str, topic: str, warehouse: str, spec: FeatureSpec,
          app_id: str, group_id: str, run_id: str, token_key: bytes, bound_s: float, commit_every_s: float,
          buckets: int, emit_every_ms: int, online_store: str | None = None, batch_wait_ms: int = 100,
          drains: bool = False, failure_path: str | None = None, store_retry_s: float = WRITE_RETRY_S) -> None:
    """The stream job's graph on ``env``. ``drains``: the job ends with a stop with drain (the
    source then has no idle timeout, see :func:`source_ddl`). ``failure_path``: where the online
    store's step writes its error before failing (see :class:`WriteOnlineStoreFn`)."""
    if not spec.entities:
        raise ValueError("the Flink stream job needs a feature spec with at least one entity")
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(source_ddl(bootstrap=bootstrap, topic=topic, group_id=group_id, bound_s=bound_s,
                                 idle_timeout=not drains))
    messages = t_env.to_data_stream(t_env.sql_query("SELECT `value`, `partition`, `offset` FROM kafka_messages"))
    by_partition = messages.key_by(lambda r: r[1], key_type=Types.INT())
    if online_store:  # not behind the watermark: the store takes events in any order
        (by_partition
         .process(WriteOnlineStoreFn(url=online_store, spec=spec, token_key=token_key, topic=topic, run_id=run_id,
                                     wait_ms=batch_wait_ms, failure_path=failure_path, retry_s=store_retry_s),
                  output_type=_BYTES)
         .name("WriteOnlineStore").uid("write-online-store"))
    parsed = (by_partition
              .process(ParseEventsFn(topic=topic, run_id=run_id, token_key=token_key, tick_ms=emit_every_ms,
                                     buckets=buckets), output_type=_BYTES)
              .name("ParseEvents").uid("parse-events"))
    unique = (parsed
              .key_by(lambda r: r[0], key_type=Types.INT())
              .process(DropRepeatedTxnFn(run_id=run_id, spec=spec, buckets=buckets), output_type=_BYTES)
              .name("DropRepeatedTxn").uid("drop-repeated-txn"))
    parts = (unique
             .key_by(lambda r: r[0], key_type=Types.STRING())
             .process(EntityFeaturesFn(spec=spec, buckets=buckets, tick_ms=emit_every_ms), output_type=_BYTES)
             .name("AccumulateInEventTime").uid("accumulate-in-event-time"))
    rows = (parts
            .key_by(lambda r: r[0], key_type=Types.INT())
            .process(JoinPartsFn(spec=spec, run_id=run_id), output_type=_BYTES)
            .name("JoinOnTxnId").uid("join-on-txn-id"))
    dead = (parsed.get_side_output(DEAD).union(unique.get_side_output(DEAD))
            .map(lambda b: (DEAD_TABLE, b), output_type=_BYTES).name("DeadLetters"))
    (rows.union(dead)
     .key_by(lambda r: r[0], key_type=Types.STRING())
     .process(CommitToDeltaFn(warehouse=warehouse, app_id=app_id, spec=spec, run_id=run_id,
                              every_s=commit_every_s), output_type=_BYTES)
     .name("CommitToDelta").uid("commit-to-delta"))


def configure(*, parallelism: int, checkpoint_dir: str, checkpoint_interval_ms: int, state_backend: str,
              from_checkpoint: str | None, bundle_ms: int = 100) -> StreamExecutionEnvironment:
    """An environment with checkpoints (retained on cancel), restarts, the Kafka connector and
    the Flink venv's python for the workers. ``bundle_ms``: the longest a Python operator holds
    its input before handing it to its Python worker (Flink's default, 1 s, is paid at every
    step of the graph)."""
    config = Configuration()
    settings = {
        "execution.checkpointing.interval": f"{checkpoint_interval_ms} ms",
        "execution.checkpointing.dir": Path(checkpoint_dir).resolve().as_uri(),
        "execution.checkpointing.savepoint-dir": (Path(checkpoint_dir).resolve() / "savepoints").as_uri(),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "state.backend.type": state_backend,
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "1000",
        "restart-strategy.fixed-delay.delay": "2 s",
        "python.executable": str(flink_env.python()),
        "python.client.executable": str(flink_env.python()),
        "pipeline.jars": flink_env.connector_jar().as_uri(),
        "python.fn-execution.bundle.time": str(max(1, bundle_ms)),
    }
    if from_checkpoint:
        settings["execution.state-recovery.path"] = from_checkpoint
    for key, value in settings.items():
        config.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(parallelism)
    env.set_python_executable(str(flink_env.python()))
    return env


def _idle(bootstrap: str, topic: str, group_id: str) -> bool:
    """Every partition of ``topic`` read to its end and that reading checkpointed (the group's
    committed offsets, which Flink commits on each completed checkpoint, are at the end)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            return False
        parts = [TopicPartition(topic, p) for p in meta.partitions]
        for committed in consumer.committed(parts, timeout=10):
            _, high = consumer.get_watermark_offsets(committed, timeout=10)
            if committed.offset < high:
                return False
        return True
    except KafkaException as exc:  # the group's coordinator moving or loading: ask again later
        _LOG.info("committed offsets unavailable: %s", exc)
        return False
    finally:
        consumer.close()


def _stop(client, savepoint_dir: str, *, drain: bool) -> str:  # noqa: ANN001
    """Stop the job with a savepoint; ``drain`` first advances the watermark to the end of time
    (Flink 2's JobClient takes a savepoint format, which PyFlink's wrapper does not pass)."""
    from pyflink.java_gateway import get_gateway

    fmt = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    return str(client._j_job_client.stopWithSavepoint(drain, savepoint_dir, fmt).get())


class _StopRequest:
    """SIGTERM or SIGINT (or the ``finfeat stream`` process that started this driver gone, named
    by ``FINFEAT_FLINK_OWNER``; else this process's parent) asks the job to stop with a
    savepoint; a second signal exits at once (128 + signal)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        owner = os.environ.get("FINFEAT_FLINK_OWNER", "")
        self._owner = int(owner) if owner.isdigit() else None
        self._parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ANN001
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum

    @property
    def requested(self) -> bool:
        if self.signal is None and not self._owner_alive():  # whoever started the job is gone
            self.signal = signal.SIGTERM
        return self.signal is not None

    def _owner_alive(self) -> bool:
        if self._owner is None:
            return os.getppid() == self._parent
        try:
            os.kill(self._owner, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie (killed, not yet reaped) is gone too
            return Path(f"/proc/{self._owner}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False


def _failure(client) -> str:  # noqa: ANN001
    """The first line of the failed job's root cause."""
    try:
        client.get_job_execution_result().result()
    except Exception as exc:  # noqa: BLE001  the failure is what is wanted here
        text = str(exc)
        causes = [line.strip() for line in text.splitlines() if "Error" in line or "Exception" in line]
        return causes[-1] if causes else text.splitlines()[0] if text else type(exc).__name__
    return "unknown cause"


def run(args: argparse.Namespace) -> int:
    spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
    token_key = os.environ.get("FINFEAT_TOKEN_KEY", "").encode()
    if not token_key:
        print("finfeat stream: error: no tokenization key (FINFEAT_TOKEN_KEY)", file=sys.stderr)
        return 2
    run_id = args.run_id or time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
    env = configure(parallelism=args.parallelism, checkpoint_dir=args.checkpoint_dir,
                    checkpoint_interval_ms=args.checkpoint_interval_ms, state_backend=args.state_backend,
                    from_checkpoint=args.from_checkpoint, bundle_ms=args.batch_wait_ms)
    # a consumer group per run: Flink commits this run's offsets to it on each completed checkpoint,
    # which is how --stop-after-idle sees that everything was read (offsets themselves live in checkpoints)
    group_id = f"{args.app_id}.{run_id}"
    failure = Path(args.checkpoint_dir).resolve() / "_failures" / run_id  # written by a failing store step
    build(env, bootstrap=args.bootstrap, topic=args.topic, warehouse=str(Path(args.warehouse).resolve()), spec=spec,
          app_id=args.app_id, group_id=group_id, run_id=run_id, token_key=token_key, bound_s=args.bound_seconds,
          commit_every_s=args.commit_every_seconds, buckets=args.buckets, emit_every_ms=args.emit_every_ms,
          online_store=args.online_store, batch_wait_ms=args.batch_wait_ms,
          drains=args.stop_after_idle is not None, failure_path=str(failure), store_retry_s=args.store_retry_seconds)
    stop = _StopRequest()
    started = time.monotonic()
    client = env.execute_async(f"finfeat-stream {args.app_id}")
    job_id = str(client.get_job_id())
    savepoints = (Path(args.checkpoint_dir).resolve() / "savepoints").as_uri()
    print(f"stream {run_id}: Flink job {job_id} running (checkpoints in {args.checkpoint_dir})", flush=True)
    quiet_since = None
    while True:
        time.sleep(1.0)
        status = client.get_job_status().result().name
        if status == "FINISHED":
            break
        if status in ("FAILED", "CANCELED"):
            cause = f"failed: {_failure(client)}" if status == "FAILED" else "was cancelled"
            print(f"stream {run_id}: the Flink job {cause}", file=sys.stderr)
            return 1
        if failure.exists():
            client.cancel().result()
            print(f"finfeat stream: error: the online store failed and the job stopped ({failure.read_text()}); "
                  "Delta commits made so far stand; resume with --from-checkpoint and the job's latest retained "
                  f"checkpoint in {args.checkpoint_dir} (store writes are idempotent)", file=sys.stderr)
            return 1
        if stop.requested:
            # no drain: events still waiting for the watermark stay in the savepoint's state, and
            # the rows waiting for their commit too; a job resumed from it carries on from there
            try:
                where = _stop(client, savepoints, drain=False)
            except Exception as exc:  # noqa: BLE001  e.g. the job not running yet: no savepoint possible
                client.cancel().result()
                print(f"stream {run_id}: stopped on request, without a savepoint ({str(exc).splitlines()[0]}); "
                      f"the job was cancelled: resume from its latest retained checkpoint in {args.checkpoint_dir}",
                      file=sys.stderr)
                return 1
            print(f"stream {run_id}: stopped on request; savepoint {where} "
                  f"(resume with --from-checkpoint {where})", flush=True)
            return 0
        if args.stop_after_idle is None:
            continue
        if _idle(args.bootstrap, args.topic, group_id):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= args.stop_after_idle:
                break
        else:
            quiet_since = None
    if status != "FINISHED":
        # drain: the watermark goes to the end of time, every timer fires, the last commit lands
        where = _stop(client, savepoints, drain=True)
        print(f"stream {run_id}: input idle for {args.stop_after_idle:g} s; drained, savepoint {where}", flush=True)
        try:
            client.get_job_execution_result().result()
        except Exception:  # noqa: BLE001  the stopped job's result may be unavailable after the stop
            pass
    features = delta.table_path(args.warehouse, delta.FEATURES)
    from deltalake import DeltaTable

    rows = delta.read_table(features, columns=["txn_id"]).num_rows if DeltaTable.is_deltatable(features) else 0
    print(f"stream {run_id} (Flink job {job_id}) finished after {time.monotonic() - started:.1f} s: "
          f"{rows:,} feature rows in {features}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finfeat.jobs.flink.stream_job", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--warehouse", required=True)
    p.add_argument("--app-id", required=True, help="names the Delta transactions and the Kafka consumer group")
    p.add_argument("--run-id")
    p.add_argument("--bound-seconds", type=float, default=5.0)
    p.add_argument("--commit-every-seconds", type=float, default=60.0)
    p.add_argument("--emit-every-ms", type=int, default=1000)
    p.add_argument("--buckets", type=int, default=1)
    p.add_argument("--stop-after-idle", type=float)
    p.add_argument("--online-store")
    p.add_argument("--batch-wait-ms", type=int, default=100,
                   help="the online store is written this long after the first message of a batch")
    p.add_argument("--store-retry-seconds", type=float, default=WRITE_RETRY_S,
                   help="keep retrying an online store that cannot be reached for this long")
    p.add_argument("--feature-spec")
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--checkpoint-interval-ms", type=int, default=DEFAULT_CHECKPOINT_INTERVAL_MS)
    p.add_argument("--state-backend", choices=["hashmap", "rocksdb"], default="hashmap")
    p.add_argument("--from-checkpoint", help="resume from this retained checkpoint or savepoint")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("FINFEAT_VERBOSE") else logging.WARNING)
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    # through the package, not as __main__: the functions are then pickled by reference
    from finfeat.jobs.flink import stream_job

    code = stream_job.main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the gateway's and the Kafka client's native threads can abort a normal interpreter exit
    # ("terminate called without an active exception"): the job's work is done, leave at once
    os._exit(code)
