"""A stop requested of the streaming job in this process (SIGTERM, Ctrl-C), seen by its steps.

The Kafka source ends its partitions' restrictions when a stop is requested, noting each
partition's watermark at that moment; the input then ends and the pipeline drains. The
entity stages release only the events that were final when the stop came (at or before the
smallest noted watermark): events read but not yet final are not emitted, and the next run,
which replays the topic, computes them with everything that comes before them.

It works where the SDK workers run in the job's process (Prism's default ``LOOPBACK``
environment); elsewhere, stop the job with the runner's own means.
"""
from __future__ import annotations

import threading


class StopSignal:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._watermarks: dict[object, int] = {}

    def request(self) -> None:
        self._event.set()

    def requested(self) -> bool:
        return self._event.is_set()

    def note_watermark(self, partition: object, watermark_us: int | None) -> None:
        """A partition ended because of the stop, with this watermark (None: it had none)."""
        if watermark_us is None:
            return
        with self._lock:
            self._watermarks.setdefault(partition, watermark_us)

    def cutoff_us(self) -> int | None:
        """Every event at or before this was final when the stop came (None: no stop, or no
        partition noted a watermark)."""
        if not self._event.is_set():
            return None
        with self._lock:
            return min(self._watermarks.values()) if self._watermarks else None

    def reset(self) -> None:
        with self._lock:
            self._event.clear()
            self._watermarks.clear()


STOP = StopSignal()
