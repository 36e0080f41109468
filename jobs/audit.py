"""The audit trail of scoring decisions: an append-only, hash-chained JSON-lines segment set.

Layout (``--audit DIR``, e.g. ``warehouse/audit``)::

    DIR/w0/seg-000001.jsonl  seg-000002.jsonl ...  HEAD.json  .lock
    DIR/w1/...                      (one stream per writing process, e.g. per serve worker)

Why JSON lines and not a Delta table: a chain needs one total order and a record must be on
disk before its decision is returned. A segment file gives both with one ``write`` per record
and one ``fsync`` per batch; a Delta commit per batch would add a log entry and a small file
each time and has no row order. The segments are plain JSON lines: DuckDB, pandas or Spark read
them as they are, and a closed segment is made read-only.

Each record carries ``seq`` (1, 2, ... per stream), ``prev`` (the previous record's hash; 64
zeros first) and ``hash`` = sha256(prev + the record's canonical JSON without ``hash``), so
``finfeat audit verify`` detects an altered, removed or reordered record. ``HEAD.json`` holds
the last synced ``seq`` and ``hash``: removing records from the end is detected back to it.

The guarantee: :meth:`AuditTrail.record` returns only after the record was written into the
segment file (the write-ahead file; one ``write`` call, no ``fsync`` on the request path). A
decision returned is therefore on the record even if the process is then killed (kill -9): the
operating system holds the bytes. A background thread ``fsync``\\ s every ``flush_interval_s``
(default 50 ms) and then updates ``HEAD.json``: a power loss or OS crash loses at most that
window (``sync=True`` makes each record wait for its batch's fsync instead). If the write fails
(disk full, I/O error) the record raises :class:`AuditUnavailable` and the caller returns no
decision (``finfeat serve`` answers 503, ``finfeat score`` exits 4); the trail refuses further
records until it is reopened. Reopening after a crash mid-write truncates the unfinished line
and appends a ``torn_tail`` record with its length and hash, so the gap is itself on the record.
"""
from __future__ import annotations

import argparse
import fcntl
import getpass
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

GENESIS = "0" * 64
SEGMENT_GLOB = "seg-*.jsonl"
HEAD_FILE = "HEAD.json"
EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


class AuditUnavailable(RuntimeError):
    """The audit record could not be written: no decision may be returned."""


def record_hash(prev: str, record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False))
                          .encode()).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _segments(stream: Path) -> list[Path]:
    return sorted(stream.glob(SEGMENT_GLOB))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class AuditTrail:
    """One writing process's stream of an audit folder; thread-safe. Use :meth:`open`."""

    def __init__(self, folder: Path, stream: Path, lock_fd: int, *, caller: str | None, sync: bool,
                 flush_interval_s: float, segment_bytes: int) -> None:
        self.folder, self.stream, self._lock_fd = folder, stream, lock_fd
        self.caller = caller
        self.sync, self.flush_interval_s, self.segment_bytes = sync, flush_interval_s, segment_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._failed: BaseException | None = None
        self._closed = False
        self.seq, self.last_hash = 0, GENESIS
        self.synced_seq, self.synced_hash = 0, GENESIS
        self._recover()
        self._flusher = threading.Thread(target=self._flush_loop, name="finfeat-audit-fsync", daemon=True)
        self._flusher.start()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, folder: str | Path, *, caller: str | None = None, sync: bool = False,
             flush_interval_s: float = 0.05, segment_bytes: int = 64 << 20) -> AuditTrail:
        """Take the first free stream (``w0``, ``w1``, ...) of ``folder`` and recover its tail."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            stream = root / f"w{n}"
            stream.mkdir(exist_ok=True)
            fd = os.open(stream / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return cls(root, stream, fd, caller=caller, sync=sync, flush_interval_s=flush_interval_s,
                       segment_bytes=segment_bytes)
        raise AuditUnavailable(f"{root}: no free audit stream")

    def _recover(self) -> None:
        segs = _segments(self.stream)
        if not segs:
            self._open_segment(self.stream / "seg-000001.jsonl")
            return
        last = segs[-1]
        data = last.read_bytes()
        torn = b""
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = data[cut:]
            with open(last, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
        lines = data.splitlines()
        if not lines and len(segs) > 1:
            lines = segs[-2].read_bytes().splitlines()
        if lines:
            rec = json.loads(lines[-1])
            self.seq, self.last_hash = int(rec["seq"]), str(rec["hash"])
        self.synced_seq, self.synced_hash = self.seq, self.last_hash
        if last.stat().st_mode & 0o222 == 0:  # closed by a rotation that crashed before the next opened
            last = self.stream / f"seg-{int(last.stem.split('-')[1]) + 1:06d}.jsonl"
        self._open_segment(last)
        if torn:
            _LOG.warning("audit %s: an unfinished record of %d bytes at the end of %s (a crash mid-write); "
                         "recorded as torn_tail", self.stream, len(torn), last.name)
            self._append({"kind": "torn_tail", "time": _now_iso(), "segment": last.name, "bytes": len(torn),
                          "sha256": hashlib.sha256(torn).hexdigest()})
            self._fsync()

    def _open_segment(self, path: Path) -> None:
        self._segment = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    # ------------------------------------------------------------------ writing

    def record(self, decision: Mapping[str, Any]) -> dict[str, Any]:
        """Append one decision (``kind: decision``); returns the stored record (with ``seq`` and
        ``hash``) once it is in the segment file; raises :class:`AuditUnavailable`."""
        rec = {"kind": "decision", **decision}
        with self._cond:
            if self._failed is not None:
                raise AuditUnavailable(f"the audit trail {self.stream} failed earlier ({self._failed}): "
                                       "no decision is returned until it is reopened") from self._failed
            if self._closed:
                raise AuditUnavailable(f"the audit trail {self.stream} is closed")
            stored = self._append(rec)
            self._cond.notify_all()
            if self.sync:
                deadline = time.monotonic() + 10
                while self.synced_seq < stored["seq"] and self._failed is None:
                    if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise AuditUnavailable(f"the audit trail {self.stream}: no fsync within 10 s")
                if self._failed is not None:
                    raise AuditUnavailable(f"the audit trail {self.stream} could not sync: {self._failed}")
        return stored

    def _append(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Under the lock: chain, serialize and write one record."""
        seq = self.seq + 1
        body = {"seq": seq, "prev": self.last_hash, **rec}
        h = record_hash(self.last_hash, body)
        stored = {**body, "hash": h}
        line = (json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()
        if self._size and self._size + len(line) > self.segment_bytes:
            self._rotate()
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            self._failed = exc
            _LOG.error("audit %s: writing record %d failed: %s", self.stream, seq, exc)
            raise AuditUnavailable(f"the audit record could not be written to {self._segment}: {exc}") from exc
        self._size += len(line)
        self.seq, self.last_hash = seq, h
        return stored

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        os.chmod(self._segment, 0o444)
        n = int(self._segment.stem.split("-")[1]) + 1
        self._open_segment(self.stream / f"seg-{n:06d}.jsonl")

    def _fsync(self) -> None:
        """Under the lock or from the flusher: make everything written durable, then HEAD."""
        seq, h = self.seq, self.last_hash
        os.fsync(self._fd)
        tmp = self.stream / (HEAD_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seq": seq, "hash": h, "segment": self._segment.name, "time": _now_iso()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.stream / HEAD_FILE)
        self.synced_seq, self.synced_hash = seq, h

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                if self.synced_seq == self.seq and not self._closed:
                    self._cond.wait(timeout=self.flush_interval_s)
                if self._closed and self.synced_seq == self.seq:
                    return
                if self._failed is not None:
                    return
                if self.synced_seq == self.seq:
                    continue
                try:
                    self._fsync()
                except OSError as exc:
                    self._failed = exc
                    _LOG.error("audit %s: fsync failed: %s", self.stream, exc)
                self._cond.notify_all()
            if not self.sync:
                time.sleep(self.flush_interval_s)  # batch: the records of this interval share one fsync

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._flusher.join(timeout=30)
        with self._cond:
            if self._failed is None and self.synced_seq != self.seq:
                self._fsync()
            os.close(self._fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decision_record(out: Mapping[str, Any], *, request_id: str, caller: str | None, spec_hash: str | None,
                    request: Mapping[str, Any]) -> dict[str, Any]:
    """The audited fields of one ``score_request`` answer."""
    keep = ("txn_id", "at_us", "features", "as_of_us", "age_s", "missing", "score", "margin", "bias", "reasons")
    rec = {"request_id": request_id, "time": _now_iso(), "caller": caller, "model_id": out.get("model_id"),
           "spec_hash": spec_hash, **{k: out[k] for k in keep if k in out}}
    for k in ("card_token", "merchant_id", "amount_minor", "currency"):
        if k in request:
            rec[k] = request[k]
    if rec.get("txn_id") is None and "txn_id" in request:
        rec["txn_id"] = request["txn_id"]
    return rec


def new_request_id() -> str:
    return uuid.uuid4().hex


def cli_caller() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


# ----------------------------------------------------------------------------------- reading


@dataclass
class VerifyReport:
    streams: dict[str, int] = field(default_factory=dict)   # stream -> records
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _records(stream: Path) -> Iterator[tuple[str, int, bytes]]:
    for seg in _segments(stream):
        for n, line in enumerate(seg.read_bytes().split(b"\n"), 1):
            if line:
                yield seg.name, n, line


def verify(folder: str | Path) -> VerifyReport:
    """Check every stream's chain (see the module docstring); an empty report is a clean trail."""
    root = Path(folder)
    report = VerifyReport()
    streams = sorted(p for p in root.glob("w*") if p.is_dir()) if root.is_dir() else []
    if not streams:
        report.problems.append(f"{root}: no audit stream (w0, w1, ...) here")
    for stream in streams:
        prev, expect, count = GENESIS, 1, 0
        hashes: dict[int, str] = {}
        for seg_name in (s.name for s in _segments(stream)):
            data = (stream / seg_name).read_bytes()
            if data and not data.endswith(b"\n"):
                report.problems.append(f"{stream.name}/{seg_name}: an unfinished last record (a crash mid-write; "
                                       "reopening the trail records it as torn_tail)")
        for seg, n, line in _records(stream):
            where = f"{stream.name}/{seg}:{n}"
            try:
                rec = json.loads(line)
            except ValueError:
                report.problems.append(f"{where}: not JSON")
                continue
            if rec.get("seq") != expect:
                report.problems.append(f"{where}: seq {rec.get('seq')} where {expect} was expected "
                                       "(a record removed, inserted or moved)")
            if rec.get("prev") != prev:
                report.problems.append(f"{where}: prev does not match the previous record's hash "
                                       "(a record removed, inserted or moved)")
            if record_hash(str(rec.get("prev")), rec) != rec.get("hash"):
                report.problems.append(f"{where}: hash mismatch (the record was altered)")
            prev = str(rec.get("hash"))
            expect = int(rec["seq"]) + 1 if isinstance(rec.get("seq"), int) else expect + 1
            hashes[int(rec.get("seq", -1))] = prev
            count += 1
        head_path = stream / HEAD_FILE
        if head_path.is_file():
            head = json.loads(head_path.read_text())
            if head["seq"] > expect - 1:
                report.problems.append(f"{stream.name}: HEAD says record {head['seq']} was synced but the trail "
                                       f"ends at {expect - 1} (records removed from the end)")
            elif head["seq"] and hashes.get(head["seq"]) != head["hash"]:
                report.problems.append(f"{stream.name}: record {head['seq']} differs from the one HEAD synced")
        report.streams[stream.name] = count
    return report


def find(folder: str | Path, *, request_id: str | None = None, txn_id: str | None = None) -> list[dict[str, Any]]:
    """Every decision record with that request id or transaction id, in stream order."""
    root = Path(folder)
    out = []
    needles = [s for s in (request_id, txn_id) if s]
    for stream in sorted(p for p in root.glob("w*") if p.is_dir()):
        for _seg, _n, line in _records(stream):
            if not any(s.encode() in line for s in needles):
                continue
            rec = json.loads(line)
            if (request_id and rec.get("request_id") == request_id) or (txn_id and rec.get("txn_id") == txn_id):
                out.append({"stream": stream.name, **rec})
    return out


# ----------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("audit", help="check the audit trail of decisions, or find a decision",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    sub = p.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser("verify", help="check every record's hash chain; exit 1 on any problem")
    v.add_argument("--dir", required=True, help="the audit folder (score/serve --audit DIR)")
    s = sub.add_parser("show", help="the decision(s) of a request id or transaction id, as JSON lines")
    s.add_argument("--dir", required=True, help="the audit folder (score/serve --audit DIR)")
    s.add_argument("--request-id")
    s.add_argument("--txn-id")
    return p


def run(args: argparse.Namespace) -> int:
    if not Path(args.dir).is_dir():
        print(f"finfeat audit: error: {args.dir} is not a folder (the --audit DIR of score or serve)", file=sys.stderr)
        return EXIT_USAGE
    if args.audit_command == "verify":
        report = verify(args.dir)
        for problem in report.problems:
            print(problem)
        total = sum(report.streams.values())
        print(f"finfeat audit: {total:,} record(s) in {len(report.streams)} stream(s): "
              f"{'chain intact' if report.ok else f'{len(report.problems)} problem(s)'}", file=sys.stderr)
        return EXIT_OK if report.ok else EXIT_BAD
    if not (args.request_id or args.txn_id):
        print("finfeat audit show: error: give --request-id or --txn-id", file=sys.stderr)
        return EXIT_USAGE
    found = find(args.dir, request_id=args.request_id, txn_id=args.txn_id)
    for rec in found:
        print(json.dumps(rec))
    return EXIT_OK if found else EXIT_MISSING
