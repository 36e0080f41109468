"""``finfeat runs``: the run history of a warehouse, from its run reports and Delta commit metadata.

Every backfill writes ``<warehouse>/_runs/<run_id>.json`` and stamps its Delta commits with
``finfeat.run_id``, ``finfeat.range``, ``finfeat.spec_hash`` and ``finfeat.code_version``.
This module reads both: a report says what a run did (counts, outcome), the commits say what it
wrote, so a run whose report was lost still shows (outcome ``unknown``) and a failed run that
committed nothing shows too. Reports of older and newer formats are read alike: missing keys
show as blanks.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

RUNS_FOLDER = "_runs"
#: Outcomes a report can carry; anything else shows as it is.
SUCCEEDED, FAILED, INTERRUPTED, RUNNING, UNKNOWN = "succeeded", "failed", "interrupted", "running", "unknown"


class RunNotFound(LookupError):
    """No run report and no Delta commit carries this run id."""


@dataclass
class RunSummary:
    """One line of the history: what ``finfeat runs`` lists."""

    run_id: str
    kind: str
    status: str
    range: str | None = None
    started_at: str | None = None
    seconds: float | None = None
    rows_read: int | None = None
    events_accepted: int | None = None
    dead_letters: int | None = None
    quarantined: int | None = None
    features_written: int | None = None
    spec_hash: str | None = None
    code_version: str | None = None
    versions: dict[str, int | None] = field(default_factory=dict)
    report_path: str | None = None
    #: from the Delta history: each table the run committed to, and the versions
    commits: dict[str, list[int]] = field(default_factory=dict)


def run_started(run_id: str) -> datetime | None:
    """The start time encoded in a run id (``YYYYmmddTHHMMSSZ-xxxxxxxx``), or None."""
    try:
        return datetime.strptime(run_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def report_started(report: dict[str, Any], run_id: str) -> datetime | None:
    """When a run started: its report's ``started_at``, else the time in its run id, else None."""
    if report.get("started_at"):
        try:
            return datetime.fromisoformat(str(report["started_at"]))
        except ValueError:
            pass
    return run_started(run_id)


def read_reports(warehouse: str | Path) -> dict[str, dict[str, Any]]:
    """Every readable run report of the warehouse by run id; a report that is not JSON is skipped
    with a warning (a run killed while writing it)."""
    folder = Path(warehouse) / RUNS_FOLDER
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            _LOG.warning("skipping unreadable run report %s: %s", path, exc)
            continue
        if isinstance(report, dict):
            report.setdefault("run_id", path.stem)
            report.setdefault("report_path", str(path))
            out[str(report["run_id"])] = report
    return out


def delta_commits(warehouse: str | Path) -> list[dict[str, Any]]:
    """Commits of the warehouse's Delta tables that carry a ``finfeat.run_id``, oldest first per table:
    ``{"table", "version", "timestamp_ms", "run_id", "range", "spec_hash", "code_version", "operation"}``."""
    from deltalake import DeltaTable

    out: list[dict[str, Any]] = []
    root = Path(warehouse)
    if not root.is_dir():
        return out
    for log in sorted(root.glob("**/_delta_log")):
        path = log.parent
        if not DeltaTable.is_deltatable(str(path)):
            continue
        table = str(path.relative_to(root))
        for entry in DeltaTable(str(path)).history():
            run_id = entry.get("finfeat.run_id")
            if not run_id:
                continue
            out.append({"table": table, "version": entry.get("version"), "timestamp_ms": entry.get("timestamp"),
                        "run_id": run_id, "range": entry.get("finfeat.range"),
                        "spec_hash": entry.get("finfeat.spec_hash"),
                        "code_version": entry.get("finfeat.code_version"), "operation": entry.get("operation")})
    out.sort(key=lambda c: (c["table"], c["version"]))
    return out


def _kind(report: dict[str, Any]) -> str:
    if report.get("kind"):
        return str(report["kind"])
    return "catch-up" if report.get("catch_up") else "backfill"


def _seconds(report: dict[str, Any], started: datetime | None, last_commit_ms: int | None) -> float | None:
    for key in ("seconds", "duration_s"):
        if isinstance(report.get(key), (int, float)):
            return float(report[key])
    finished = report.get("finished_at") or report.get("updated_at")
    start = report.get("started_at")
    try:
        if finished and start:
            return (datetime.fromisoformat(finished) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        pass
    if started is not None and last_commit_ms is not None:
        # no duration in the report: up to its last commit (the run id holds the start, to the second)
        return max(0.0, last_commit_ms / 1000 - started.timestamp())
    return None


def summarize(warehouse: str | Path) -> list[RunSummary]:
    """Every run the warehouse knows of, oldest first."""
    reports = read_reports(warehouse)
    commits = delta_commits(warehouse)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for c in commits:
        by_run.setdefault(c["run_id"], []).append(c)
    runs: list[RunSummary] = []
    for run_id in sorted(set(reports) | set(by_run)):
        report = reports.get(run_id, {})
        mine = by_run.get(run_id, [])
        started = report_started(report, run_id)
        if started is None and mine:
            started = datetime.fromtimestamp(min(c["timestamp_ms"] for c in mine) / 1000, tz=timezone.utc)
        tables = report.get("tables") if isinstance(report.get("tables"), dict) else {}
        versions = {name: (info.get("version") if isinstance(info, dict) else info) for name, info in tables.items()}
        commit_versions: dict[str, list[int]] = {}
        for c in mine:
            commit_versions.setdefault(c["table"], []).append(c["version"])
        for name, vs in commit_versions.items():
            versions.setdefault(name, max(vs))
        first = mine[0] if mine else {}
        validation = report.get("validation") if isinstance(report.get("validation"), dict) else {}
        quarantined = None
        if "events_quarantined" in report or validation:
            quarantined = int(report.get("events_quarantined") or 0) + int(validation.get("quarantined") or 0)
        runs.append(RunSummary(
            run_id=run_id, kind=_kind(report) if report else "backfill",
            status=str(report.get("status", UNKNOWN)) if report else UNKNOWN,
            range=report.get("range") or first.get("range"),
            started_at=started.isoformat() if started else None,
            seconds=_seconds(report, started, max((c["timestamp_ms"] for c in mine), default=None)),
            rows_read=report.get("rows_read"), events_accepted=report.get("events_accepted"),
            dead_letters=report.get("dead_letters"), quarantined=quarantined,
            features_written=report.get("features_written"),
            spec_hash=report.get("spec_hash") or first.get("spec_hash"),
            code_version=report.get("code_version") or first.get("code_version"),
            versions=versions, report_path=report.get("report_path"), commits=commit_versions))
    runs.sort(key=lambda r: (r.started_at or "", r.run_id))
    return runs


def find_run(warehouse: str | Path, run_id: str) -> dict[str, Any]:
    """The whole report of one run plus its Delta commits (``_commits``); a unique prefix of the
    run id is enough."""
    reports = read_reports(warehouse)
    commits = delta_commits(warehouse)
    ids = set(reports) | {c["run_id"] for c in commits}
    matches = [r for r in ids if r == run_id] or sorted(r for r in ids if r.startswith(run_id))
    if len(matches) != 1:
        hint = f"; it matches {', '.join(matches)}" if matches else "; `finfeat runs` lists the run ids"
        raise RunNotFound(f"no single run {run_id!r} in {warehouse}{hint}")
    found = matches[0]
    report = dict(reports.get(found, {"run_id": found, "status": UNKNOWN, "note": "no run report; from Delta commits"}))
    report["_commits"] = [c for c in commits if c["run_id"] == found]
    return report


# ----------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("runs", help="the run history of a warehouse: outcome, counts, versions",
                              description="Lists runs (oldest first, the last N) from the run reports in "
                                          "<warehouse>/_runs and the Delta commit metadata. Failed, "
                                          "interrupted and running runs are marked. "
                                          "`finfeat runs show RUN_ID` prints one run's whole report.",
                              allow_abbrev=False)
    p.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    p.add_argument("--last", type=_positive, help="only the last N runs")
    p.add_argument("--json", action="store_true", help="one JSON object per run, one per line")
    sub = p.add_subparsers(dest="runs_command")
    show = sub.add_parser("show", help="the whole report of one run", allow_abbrev=False)
    show.add_argument("run_id", help="a run id (or a unique prefix of one)")
    show.add_argument("--warehouse", default=argparse.SUPPRESS, help="folder of the Delta tables")
    return p


def _positive(text: str) -> int:
    from finfeat.jobs.argtypes import positive_int

    return positive_int(text)


_MARKS = {SUCCEEDED: "ok", FAILED: "FAILED", INTERRUPTED: "INTERRUPTED", RUNNING: "running", UNKNOWN: "no report"}


def _fmt_int(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def format_table(runs: list[RunSummary]) -> str:
    header = ["run id", "kind", "range", "started (UTC)", "secs", "outcome", "read", "accepted", "dead",
              "quar.", "written", "versions", "spec", "code"]
    rows = [header]
    for r in runs:
        started = (r.started_at or "")[:19].replace("T", " ")
        versions = " ".join(f"{k}={v}" for k, v in sorted(r.versions.items()) if v is not None)
        rows.append([r.run_id, r.kind, r.range or "", started, "" if r.seconds is None else f"{r.seconds:.1f}",
                     _MARKS.get(r.status, r.status), _fmt_int(r.rows_read), _fmt_int(r.events_accepted),
                     _fmt_int(r.dead_letters), _fmt_int(r.quarantined), _fmt_int(r.features_written), versions,
                     r.spec_hash or "", r.code_version or ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> int:
    warehouse = Path(args.warehouse)
    if not warehouse.is_dir():
        print(f"finfeat runs: error: no warehouse at {warehouse}; pass --warehouse with the folder a backfill "
              "wrote", file=sys.stderr)
        return 2
    if getattr(args, "runs_command", None) == "show":
        try:
            report = find_run(warehouse, args.run_id)
        except RunNotFound as exc:
            print(f"finfeat runs show: error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
        return 0
    runs = summarize(warehouse)
    if args.last:
        runs = runs[-args.last:]
    if args.json:
        for r in runs:
            print(json.dumps(asdict(r), sort_keys=True))
        return 0
    if not runs:
        print(f"no runs in {warehouse}")
        return 0
    print(format_table(runs))
    bad = sum(r.status in (FAILED, INTERRUPTED) for r in runs)
    print(f"{len(runs)} run(s); {bad} failed or interrupted")
    return 0
