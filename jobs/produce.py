"""``finfeat produce``: publish transactions to a Kafka topic, in order or with bounded disorder;
or, with ``--labels``, a labels feed as label messages in label-time order."""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pyarrow as pa

_LOG = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="publish transactions (or labels: --labels) to a Kafka topic as JSON",
                       allow_abbrev=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", action="append", help="a file or folder of events; repeatable")
    what.add_argument("--labels", action="append", metavar="FILE",
                      help="instead: a labels file (txn_id, is_fraud, label_time), published as finfeat.label.v1 "
                           "messages (default topic labels); repeatable")
    p.add_argument("--mapping", default="generated", help="mapping YAML or built-in name (default generated)")
    p.add_argument("--bootstrap", default="127.0.0.1:19092", help="Kafka bootstrap servers")
    p.add_argument("--topic", help="default transactions (labels with --labels)")
    p.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    p.add_argument("--disorder-seconds", type=float, default=0.0,
                   help="deliver each event up to this much event time late (bounded disorder)")
    p.add_argument("--limit", type=int, default=0, help="publish at most this many events (0 = all)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--demo-key", action="store_true", help="tokenize with the public demo key if unset")


def delivery_order(event_time_us: np.ndarray, *, disorder_us: int, seed: int) -> np.ndarray:
    """Event-time order, or each event delayed by up to ``disorder_us`` of event time."""
    idx = np.arange(len(event_time_us))
    if disorder_us <= 0:
        return np.lexsort((idx, event_time_us))
    delay = np.random.default_rng(seed).integers(0, disorder_us, size=len(idx))
    return np.lexsort((idx, event_time_us + delay))


def send(producer, topic: str, key: bytes | None, value: bytes, *, backoff_s: float = 0.05) -> None:  # noqa: ANN001
    """Queue one message on a confluent-kafka producer, serving delivery reports while its
    local queue is full (never drops a message)."""
    while True:
        try:
            producer.produce(topic, value=value, key=key)
            return
        except BufferError:
            producer.poll(backoff_s)


def produce(events: pa.Table, *, bootstrap: str, topic: str, rate: float = 0.0, disorder_us: int = 0,
            seed: int = 5) -> int:
    from finfeat.jobs.kafka.messages import encode_events

    order = delivery_order(events.column("event_time").cast(pa.int64()).to_numpy(), disorder_us=disorder_us,
                           seed=seed)
    return _publish(encode_events(events.take(pa.array(order))), bootstrap=bootstrap, topic=topic, rate=rate,
                    what="messages")


def _publish(messages: list[tuple[bytes, bytes]], *, bootstrap: str, topic: str, rate: float, what: str) -> int:
    """Send ``(key, value)`` messages in order (idempotent producer, every replica acknowledging),
    at ``rate`` per second (0: as fast as the broker takes them); returns how many."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                         "acks": "all"})
    started = time.monotonic()
    for i, (key, value) in enumerate(messages):
        if rate > 0:
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        send(producer, topic, key, value)
        producer.poll(0)
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} {what} were not delivered to {bootstrap}")
    return len(messages)


def produce_labels(labels: pa.Table, *, bootstrap: str, topic: str, rate: float = 0.0) -> int:
    """Publish parsed labels (:data:`~finfeat.schemas.labels.LABEL_SCHEMA`) in label-time order
    (then txn id) as ``finfeat.label.v1`` messages keyed by txn id; returns how many."""
    from finfeat.jobs.kafka.messages import encode_labels

    messages = encode_labels(labels.sort_by([("label_time", "ascending"), ("txn_id", "ascending")]))
    return _publish(messages, bootstrap=bootstrap, topic=topic, rate=rate, what="label messages")


def _run_labels(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finfeat.jobs.online.base import wall_clock_us
    from finfeat.jobs.sources import read_labels_file
    from finfeat.transforms.labels import parse_labels

    recorded = wall_clock_us()
    parts, dead = [], 0
    for name in args.labels:
        path = Path(name)
        for raw, unreadable in read_labels_file(path, run_id="produce", recorded_at_us=recorded):
            labels, bad = parse_labels(raw, source=path.name, run_id="produce", recorded_at_us=recorded)
            parts.append(labels)
            dead += unreadable.num_rows + bad.num_rows
    labels = pa.concat_tables(parts)
    if args.limit:
        labels = labels.sort_by([("label_time", "ascending"), ("txn_id", "ascending")]).slice(0, args.limit)
    topic = args.topic or "labels"
    n = produce_labels(labels, bootstrap=args.bootstrap, topic=topic, rate=args.rate)
    print(f"published {n:,} labels to {topic} on {args.bootstrap}"
          + (f" ({dead:,} label rows were not valid labels and were skipped)" if dead else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    from finfeat.jobs.options import token_key as _token_key
    from finfeat.jobs.sources import parse_files
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer

    if args.labels:
        if args.disorder_seconds:
            raise ValueError("--disorder-seconds is for events; labels are published in label-time order")
        return _run_labels(args)
    args.topic = args.topic or "transactions"
    events, dead = parse_files(args.input, Mapping.load(args.mapping), CardTokenizer(_token_key(args, demo=False)),
                               run_id="produce")
    if args.limit:
        events = events.sort_by("event_time").slice(0, args.limit)
    n = produce(events, bootstrap=args.bootstrap, topic=args.topic, rate=args.rate,
                disorder_us=int(args.disorder_seconds * 1_000_000), seed=args.seed)
    print(f"published {n:,} events to {args.topic} on {args.bootstrap}"
          + (f" ({dead:,} input rows were not valid events and were skipped)" if dead else ""))
    return 0
