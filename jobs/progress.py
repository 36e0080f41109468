"""Progress of a long job and its log lines: a bar on a terminal, plain lines elsewhere, JSON on request.

The read step of the backfill counts rows per batch (one call per Arrow batch, never per row)
into the process's active :class:`Progress`; a thread renders it: a tqdm bar on a terminal,
a plain line every ``interval_s`` seconds when the output is not a terminal (an orchestrator's
log), or one JSON object per line (``--log-format json``) carrying the run id. Workers in other
processes (a portable runner) have no active progress, and the hooks do nothing there.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Literal

_LOG = logging.getLogger(__name__)

LogFormat = Literal["text", "json"]
LOG_FORMATS = ("text", "json")

_ACTIVE: Progress | None = None
_ACTIVE_LOCK = threading.Lock()
#: the run id that JSON log lines carry (the job sets it when it starts)
_RUN_ID: str | None = None


def set_run_id(run_id: str | None) -> None:
    global _RUN_ID
    _RUN_ID = run_id


def rows_parsed(n: int) -> None:
    """Count ``n`` rows read by the read step (a no-op without an active progress)."""
    active = _ACTIVE
    if active is not None:
        active.add(rows=n)


def file_done() -> None:
    active = _ACTIVE
    if active is not None:
        active.add(files=1)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, run id (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _now_iso(), "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "run_id": _RUN_ID}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(log_format: LogFormat) -> None:
    """Switch the root logger's handlers to JSON lines (``json``); ``text`` leaves them as they are."""
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(JsonLogFormatter())


def emit_json(event: str, stream: IO[str] | None = None, **fields: object) -> None:
    """A structured line outside logging (progress, plans, the final report), with the run id."""
    out = {"ts": _now_iso(), "event": event, "run_id": fields.pop("run_id", _RUN_ID), **fields}
    print(json.dumps(out, default=str), file=stream or sys.stderr, flush=True)


class Progress:
    """Files read, rows parsed, rows/s and elapsed time of one run, rendered by a thread."""

    def __init__(self, *, run_id: str, total_files: int, log_format: LogFormat = "text",
                 stream: IO[str] | None = None, interval_s: float = 10.0, label: str = "backfill") -> None:
        self.run_id, self.total_files, self.log_format = run_id, total_files, log_format
        self._stream = stream or sys.stderr
        self._interval, self._label = interval_s, label
        self._lock = threading.Lock()
        self.files = self.rows = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def add(self, *, rows: int = 0, files: int = 0) -> None:
        with self._lock:
            self.rows += rows
            self.files += files

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            files, rows = self.files, self.rows
        elapsed = time.monotonic() - self._started
        return {"files_done": files, "files_total": self.total_files, "rows_parsed": rows,
                "rows_per_s": round(rows / elapsed, 1) if elapsed > 0 else 0.0, "elapsed_s": round(elapsed, 1)}

    def _render(self, *, final: bool = False) -> None:
        s = self.snapshot()
        if self.log_format == "json":
            emit_json("progress", self._stream, run_id=self.run_id, final=final, **s)
        elif self._bar is not None:
            self._bar.n = int(s["files_done"])
            self._bar.set_postfix_str(f"{s['rows_parsed']:,} rows parsed, {s['rows_per_s']:,.0f} rows/s",
                                      refresh=True)
        else:
            print(f"{self._label} {self.run_id}: {s['files_done']}/{s['files_total']} files, "
                  f"{s['rows_parsed']:,} rows parsed, {s['rows_per_s']:,.0f} rows/s, {s['elapsed_s']:.1f} s elapsed"
                  + (" (done)" if final else ""), file=self._stream, flush=True)

    def _loop(self) -> None:
        period = 0.5 if self._bar is not None else self._interval
        while not self._stop.wait(period):
            self._render()

    def __enter__(self) -> Progress:
        global _ACTIVE
        if self.log_format == "text" and getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_files, unit="file", desc=f"{self._label} {self.run_id}",
                             file=self._stream, dynamic_ncols=True)
        with _ACTIVE_LOCK:
            _ACTIVE = self
        self._thread = threading.Thread(target=self._loop, name="finfeat-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _ACTIVE_LOCK:
            if _ACTIVE is self:
                _ACTIVE = None
        self._render(final=True)
        if self._bar is not None:
            self._bar.close()
