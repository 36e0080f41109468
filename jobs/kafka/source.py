"""A Kafka source for Beam's Python SDK: a splittable DoFn per topic partition.

Each partition is an offset restriction ``[start, end)``; the DoFn claims offsets as it
emits messages and sets the watermark to the largest event time seen minus the bound on
out-of-orderness. One poll's messages travel as one element, ``(partition, [(offset,
value), ...])``, stamped with the earliest event time in it (never behind the watermark
already set): downstream steps work on whole batches, and a per-message element would cost
more in the runner than the message itself. A poll waits up to ``poll_s`` for a first
message, then up to ``batch_wait_s`` for more (or ``max_batch``): the batch wait trades the
latency of every message (it waits for its batch) for fewer, larger batches. Between polls
it defers the rest of the restriction, so the runner can checkpoint it.
``stop_after_idle_s`` ends a partition after that long without messages (for demos, tests
and catch-up runs); without it the source is unbounded. A stop requested in this process
(:mod:`finfeat.pipelines.stop`) ends every partition at its next poll.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from finfeat.pipelines.stop import STOP

_LOG = logging.getLogger(__name__)
END_OF_TIME = (1 << 62)
#: How long a poll waits for more messages after the first one (see the module docstring).
DEFAULT_BATCH_WAIT_S = 0.1  # measured on Prism, 2 cores: 1,000 and 2,000 events/s kept up, online p99 ~0.4 s
#: At most this many messages per poll. Only a backlog fills a poll (a live stream's polls end at the
#: batch wait); larger polls mean larger flushes, and a flush's fixed cost (its entities' history) is
#: shared by more events: on a 45-day backlog the steps ran 1.8x faster at 50,000 than at 5,000.
DEFAULT_MAX_BATCH = 50_000


class _CheckpointOnlyTracker(OffsetRestrictionTracker):
    """Offsets of one partition: the runner may checkpoint (split at 0) but not split the
    open-ended remainder by fraction (a partition is read by one reader, in order)."""

    def try_split(self, fraction_of_remainder: float):  # noqa: ANN201
        if fraction_of_remainder == 0:
            return super().try_split(0)
        return None


#: ``"event_time":"..."`` as a key: a quote inside a JSON string is always escaped, so these bytes
#: occur only where the key is (the producer writes compact JSON; other spellings are parsed whole)
_EVENT_TIME = re.compile(rb'"event_time":"([^"\\]{1,64})"')


def _micros(text: str) -> int:
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def event_time_of(value: bytes | None) -> int | None:
    """The message's event time in µs, or None when it cannot be read (a dead letter later).

    Only for the watermark and the element's timestamp: the parser reads the whole message."""
    if not value:
        return None
    found = _EVENT_TIME.search(value)
    if found is not None:
        try:
            return _micros(found.group(1).decode())
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        return _micros(json.loads(value)["event_time"])
    except (TypeError, ValueError, KeyError):
        return None


class ReadKafkaPartitionFn(beam.DoFn, RestrictionProvider):
    """(topic, partition) -> one ``(partition, [(offset, value), ...])`` per poll.

    The DoFn is its own restriction provider: a partition's restriction is the offsets from
    the earliest (or latest) one on, never split.
    """

    def __init__(self, *, bootstrap: str, start: str = "earliest", bound_s: float = 5.0,
                 stop_after_idle_s: float | None = None, poll_s: float = 0.5, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        if batch_wait_s < 0:
            raise ValueError("batch_wait_s must not be negative")
        self._bootstrap, self._start = bootstrap, start
        self._bound = Duration(micros=int(bound_s * 1_000_000))
        self._idle, self._poll, self._max_batch = stop_after_idle_s, poll_s, max_batch
        self._batch_wait = batch_wait_s
        self._consumers: dict[tuple[str, int], object] = {}
        self._last_message: dict[tuple[str, int], float] = {}

    def _consumer(self, topic: str, partition: int, offset: int) -> object:
        from confluent_kafka import Consumer, TopicPartition

        key = (topic, partition)
        if key not in self._consumers:
            c = Consumer({"bootstrap.servers": self._bootstrap, "group.id": f"finfeat-{topic}",
                          "enable.auto.commit": False, "auto.offset.reset": "earliest"})
            c.assign([TopicPartition(topic, partition, offset)])
            self._consumers[key] = (c, offset)
        c, expected = self._consumers[key]
        if expected != offset:  # the runner resumed us elsewhere (after a retry): seek there
            from confluent_kafka import TopicPartition

            c.seek(TopicPartition(topic, partition, offset))
        return c

    def initial_restriction(self, element: tuple[str, int]) -> OffsetRange:
        from confluent_kafka import Consumer, TopicPartition

        topic, partition = element
        consumer = Consumer({"bootstrap.servers": self._bootstrap, "group.id": "finfeat-offsets",
                             "enable.auto.commit": False})
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        finally:
            consumer.close()
        return OffsetRange(low if self._start == "earliest" else high, END_OF_TIME)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return _CheckpointOnlyTracker(restriction)

    def restriction_size(self, element: object, restriction: OffsetRange) -> int:
        return 1  # one partition is one unit of work

    def split(self, element: object, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction

    def teardown(self) -> None:
        for c, _ in self._consumers.values():
            c.close()

    @beam.DoFn.unbounded_per_element()
    def process(self, element: tuple[str, int],
                tracker=beam.DoFn.RestrictionParam(),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())
                ) -> Iterator[TimestampedValue]:
        topic, partition = element
        if STOP.requested():  # end the restriction: the input ends and the pipeline drains
            before = watermark.current_watermark()
            STOP.note_watermark((topic, partition), None if before is None else before.micros)
            tracker.try_claim(END_OF_TIME - 1)
            return
        offset = tracker.current_restriction().start
        consumer = self._consumer(topic, partition, offset)
        # wait (up to the poll time) for a first message, then up to the batch wait for more:
        # ``consume(n, timeout)`` returns only when it has n messages or the timeout has passed
        messages = consumer.consume(num_messages=1, timeout=self._poll)
        if messages and self._max_batch > 1:
            messages += consumer.consume(num_messages=self._max_batch - 1, timeout=self._batch_wait)
        key = (topic, partition)
        now = time.monotonic()
        self._last_message.setdefault(key, now)
        before = watermark.current_watermark()
        batch: list[tuple[int, bytes]] = []
        earliest = latest = None
        stopped = False
        for msg in messages:
            if msg.error():
                _LOG.warning("Kafka error on %s/%s: %s", topic, partition, msg.error())
                continue
            if not tracker.try_claim(msg.offset()):
                stopped = True
                break
            self._last_message[key] = now
            t = event_time_of(msg.value())
            if t is not None:
                earliest = t if earliest is None else min(earliest, t)
                latest = t if latest is None else max(latest, t)
            batch.append((msg.offset(), msg.value()))
            offset = msg.offset() + 1
        if batch:
            stamp = Timestamp(micros=earliest) if earliest is not None else (before or Timestamp(micros=0))
            if before is not None and stamp < before:
                stamp = before
            yield TimestampedValue((partition, batch), stamp)
        if stopped:
            return
        self._consumers[key] = (consumer, offset)
        if latest is not None:
            candidate = Timestamp(micros=latest) - self._bound
            if before is None or candidate > before:
                watermark.set_watermark(candidate)
        if self._idle is not None and now - self._last_message[key] > self._idle:
            tracker.try_claim(END_OF_TIME - 1)
            return
        tracker.defer_remainder(Duration(seconds=0.05))


class ReadFromKafkaTopic(beam.PTransform):
    """All partitions of a topic -> ``(partition, [(offset, value bytes), ...])``, one per poll."""

    def __init__(self, *, bootstrap: str, topic: str, start: str = "earliest", bound_s: float = 5.0,
                 stop_after_idle_s: float | None = None, poll_s: float = 0.5,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        super().__init__()
        if start not in {"earliest", "latest"}:
            raise ValueError("start must be 'earliest' or 'latest'")
        self._bootstrap, self._topic, self._start = bootstrap, topic, start
        self._bound, self._idle, self._poll, self._batch_wait = bound_s, stop_after_idle_s, poll_s, batch_wait_s

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        from confluent_kafka.admin import AdminClient

        meta = AdminClient({"bootstrap.servers": self._bootstrap}).list_topics(self._topic, timeout=10)
        topic = meta.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ValueError(f"topic {self._topic!r} not found on {self._bootstrap}; create it or produce to it first")
        partitions = sorted(topic.partitions)
        fn = ReadKafkaPartitionFn(bootstrap=self._bootstrap, start=self._start, bound_s=self._bound,
                                  stop_after_idle_s=self._idle, poll_s=self._poll, batch_wait_s=self._batch_wait)
        return (pbegin
                | "ListPartitions" >> beam.Create([(self._topic, p) for p in partitions])
                | "ReadPartitions" >> beam.ParDo(fn))
