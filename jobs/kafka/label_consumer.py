"""Labels from a Kafka topic into the online store, at least once, with dead letters.

A consumer in a consumer group reads ``finfeat.label.v1`` messages in batches. Each batch is
decoded and checked as a labels file is (:func:`~finfeat.jobs.kafka.messages.decode_labels`),
its labels are written with ``store.write_labels`` and its dead letters to the sinks, and only
then are the group's offsets committed. A consumer killed at any point re-reads, on restart, the
batches whose offsets were not committed; the store's label writes are idempotent and
order-independent (the latest label time wins), and the dead-letter sinks skip the dead letters
they already hold, so the end state is the same as one uninterrupted run. A stop request
(:class:`threading.Event`, set by SIGTERM or Ctrl-C in the CLI) ends the loop after the current
batch is written and committed.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from finfeat.jobs import testhooks
from finfeat.jobs.online.base import OnlineStore, wall_clock_us
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA

_LOG = logging.getLogger(__name__)
#: Dead letters of one message are recognised by these columns (a re-read keeps them once).
DEAD_LETTER_KEY = ("source", "source_row", "reason", "txn_id")
DEFAULT_MAX_BATCH = 5_000
DEFAULT_BATCH_WAIT_S = 0.1


class LabelConsumerError(RuntimeError):
    """The topic is missing or the broker refused the consumer; the message says what to do."""


class TopicNotFound(LabelConsumerError):
    """The topic does not exist on the broker."""


class DeadLetterSink(Protocol):
    name: str

    def write(self, dead: pa.Table) -> int:
        """Keep the dead letters not kept yet; return how many were new."""


def _key(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row.get(c) for c in DEAD_LETTER_KEY)


class JsonlDeadLetters:
    """Dead letters appended to a JSON Lines file, each message's once.

    On opening, the keys already in the file are read (a torn last line, left by a kill in the
    middle of a write, is cut off: its batch was not committed and is read again)."""

    name = "file"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: set[tuple[object, ...]] = set()
        try:
            self.path.open("a").close()   # fail now, not after the first batch is written
        except OSError as exc:
            raise ValueError(f"cannot write the dead-letter file {self.path}: {exc}") from exc
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[:data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                _LOG.warning("dead-letter file %s ends in a partial line (an interrupted write): cut off", self.path)
                with self.path.open("r+b") as fh:
                    fh.truncate(len(whole))
            for n, line in enumerate(whole.splitlines(), start=1):
                if line.strip():
                    try:
                        self._seen.add(_key(json.loads(line)))
                    except (ValueError, AttributeError) as exc:
                        raise ValueError(f"dead-letter file {self.path}, line {n}, is not a dead letter ({exc}): "
                                         "pass another --dead-letters file") from exc

    def write(self, dead: pa.Table) -> int:
        rows = [r for r in dead.to_pylist() if _key(r) not in self._seen]
        if not rows:
            return 0
        text = "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        self._seen.update(_key(r) for r in rows)
        return len(rows)


class DeltaDeadLetters:
    """Dead letters appended to the warehouse's ``dead_letters`` Delta table, one commit per
    batch with an application transaction, without the ones the table already holds (the
    stream job's exactly-once micro-batch commit)."""

    name = "warehouse"

    def __init__(self, warehouse: str | Path, *, app_id: str, metadata: dict[str, str]) -> None:
        from finfeat.jobs import delta

        self.path = delta.table_path(str(warehouse), delta.DEAD_LETTERS)
        try:
            Path(warehouse).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the warehouse {warehouse}: {exc}") from exc
        if not os.access(warehouse, os.W_OK | os.X_OK):
            raise ValueError(f"the warehouse {warehouse} is not writable; pass another --warehouse")
        self._app_id, self._metadata = app_id, metadata
        self._version: int | None = None

    def write(self, dead: pa.Table) -> int:
        from finfeat.jobs.stream_commit import commit_micro_batch

        done = commit_micro_batch(self.path, [dead], app_id=self._app_id, kind="dead_letters",
                                  schema=DEAD_LETTER_SCHEMA, key_columns=DEAD_LETTER_KEY, partition_by="recorded_date",
                                  metadata=self._metadata, last_version=self._version, match_partitions=False)
        if done is None:
            return 0
        self._version = done.app_version
        return done.rows


@dataclass
class ConsumeReport:
    """What one run of the consumer read and wrote (``messages_read = labels_accepted + dead_letters``)."""

    messages_read: int = 0
    labels_accepted: int = 0
    labels_written: int = 0        # after keeping one label per txn id and batch
    dead_letters: int = 0
    #: per sink, the dead letters it did not hold yet (a re-read batch's are there already)
    dead_letters_new: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    stopped_by: str = "idle"

    def reconciles(self) -> bool:
        return self.messages_read == self.labels_accepted + self.dead_letters


def check_topic(bootstrap: str, topic: str, *, timeout_s: float = 10.0) -> int:
    """The topic's number of partitions; :class:`LabelConsumerError` when it is not there."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise LabelConsumerError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    found = meta.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise TopicNotFound(f"topic {topic!r} not found on {bootstrap}; create it or produce to it first "
                                 "(finfeat produce --labels FILE --topic ...)")
    return len(found.partitions)


def consume_labels(store: OnlineStore, *, bootstrap: str, topic: str, group: str,
                   sinks: Sequence[DeadLetterSink] = (), run_id: str, default_source: str | None = None,
                   max_batch: int = DEFAULT_MAX_BATCH, poll_s: float = 0.5,
                   batch_wait_s: float = DEFAULT_BATCH_WAIT_S, stop_after_idle_s: float | None = None,
                   stop: threading.Event | None = None) -> ConsumeReport:
    """Consume label messages of ``topic`` as member of ``group`` until ``stop`` is set or, once
    every assigned partition is read to its end, no message came for ``stop_after_idle_s`` (None:
    until stopped); see the module docstring.
    Store errors propagate (the failed batch's offsets are not committed)."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    check_topic(bootstrap, topic)
    stop = stop or threading.Event()
    report = ConsumeReport()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest",
                         # a member killed without leaving holds its partitions this long: a restart waits for it
                         "session.timeout.ms": 10_000, "client.id": f"finfeat-store-labels-{os.getpid()}"})
    last_seen = time.monotonic()

    def on_assign(c: object, partitions: list[object]) -> None:
        nonlocal last_seen
        last_seen = time.monotonic()  # the idle time counts from when there is something to read
        _LOG.info("reading labels from %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions))

    consumer.subscribe([topic], on_assign=on_assign)
    try:
        while True:
            if stop.is_set():
                report.stopped_by = "signal"
                break
            messages = consumer.consume(num_messages=1, timeout=poll_s)
            if messages and max_batch > 1:
                messages += consumer.consume(num_messages=max_batch - 1, timeout=batch_wait_s)
            good = []
            for msg in messages:
                err = msg.error()
                if err is None:
                    good.append(msg)
                elif err.fatal():
                    raise LabelConsumerError(f"Kafka error on {topic}: {err}")
                else:
                    _LOG.warning("Kafka error on %s: %s", topic, err)
            if not good:
                if (stop_after_idle_s is not None and time.monotonic() - last_seen > stop_after_idle_s
                        and _read_to_end(consumer)):
                    break
                continue
            last_seen = time.monotonic()
            _write_batch(store, good, topic=topic, sinks=sinks, run_id=run_id,
                         default_source=default_source or topic, report=report)
            testhooks.reached(f"labels:before-commit:{report.batches}")  # batch n written, not committed
            ends: dict[int, int] = {}
            for msg in good:
                ends[msg.partition()] = max(ends.get(msg.partition(), -1), msg.offset() + 1)
            try:
                consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in sorted(ends.items())],
                                asynchronous=False)
            except KafkaException as exc:
                code = exc.args[0].code() if exc.args and isinstance(exc.args[0], KafkaError) else None
                if code in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                            KafkaError.UNKNOWN_MEMBER_ID):
                    # the partitions moved to another member, which reads these labels again: harmless
                    _LOG.warning("offsets of a written batch not committed (%s): it will be read again", exc)
                    continue
                raise LabelConsumerError(f"committing offsets on {bootstrap} failed: {exc}; the labels are "
                                         "written, a restart reads the batch again") from exc
    finally:
        consumer.close()
    return report


def _read_to_end(consumer: object) -> bool:
    """Whether this member has partitions and has read each to its end (an idle stop must not
    come while the group is still joining or the first fetch is under way)."""
    from confluent_kafka import KafkaException

    parts = consumer.assignment()
    if not parts:
        return False
    try:
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        for tp in consumer.position(parts):
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            at = tp.offset if tp.offset >= 0 else committed.get(tp.partition, -1)
            if high > low and at < high:
                return False
    except KafkaException as exc:  # the broker did not answer: not known to be at the end, keep polling
        _LOG.warning("cannot tell whether the labels topic is read to its end: %s", exc)
        return False
    return True


def _write_batch(store: OnlineStore, messages: list[object], *, topic: str, sinks: Sequence[DeadLetterSink],
                 run_id: str, default_source: str, report: ConsumeReport) -> None:
    from finfeat.jobs.kafka.messages import decode_labels

    recorded = wall_clock_us()
    by_partition: dict[int, list[tuple[int, bytes | None]]] = {}
    for msg in messages:
        by_partition.setdefault(msg.partition(), []).append((msg.offset(), msg.value()))
    labels, dead = [], []
    for partition, batch in sorted(by_partition.items()):
        got, bad = decode_labels(batch, source=f"{topic}/{partition}", default_source=default_source, run_id=run_id,
                                 recorded_at_us=recorded)
        labels.append(got)
        dead.append(bad)
    table = pa.concat_tables(labels)
    dead_table = pa.concat_tables(dead)
    written = store.write_labels(table).labels if table.num_rows else 0
    if dead_table.num_rows:
        for sink in sinks:
            try:
                new = sink.write(dead_table)
            except Exception as exc:  # disk full, a Delta conflict: the batch is not committed
                raise LabelConsumerError(f"writing dead letters to the {sink.name} failed ({type(exc).__name__}: "
                                         f"{exc}); the batch's offsets are not committed: a restart reads it "
                                         "again") from exc
            report.dead_letters_new[sink.name] = report.dead_letters_new.get(sink.name, 0) + new
    report.messages_read += len(messages)
    report.labels_accepted += table.num_rows
    report.labels_written += written
    report.dead_letters += dead_table.num_rows
    report.batches += 1
    for reason in dead_table.column("reason").to_pylist():
        report.dead_letters_by_reason[reason] = report.dead_letters_by_reason.get(reason, 0) + 1
    _LOG.info("labels batch: %d messages, %d labels written, %d dead letters", len(messages), written,
              dead_table.num_rows)
