"""``finfeat maintain``: compact small files, then vacuum files no version needs, with a safe retention.

Each backfill commit adds a few files per ``event_date`` partition and replaces earlier ones;
the replaced files stay on disk (time travel to earlier versions reads them) until a vacuum.

* compaction: ``DeltaTable.optimize.compact()`` (delta-rs, ``--engine local``) or ``OPTIMIZE``
  (delta-spark, ``--engine spark``): small files of a partition are rewritten into larger
  ones in one commit; the table's content does not change.
* vacuum: files that the table stopped referencing (or that no commit ever referenced: a run killed
  before its commit) more than the retention ago are deleted
  (``vacuum`` / ``VACUUM ... RETAIN n HOURS``). After it, time travel to versions older than the
  retention can fail: pinned training sets older than that cannot be rebuilt.

The retention defaults to 7 days. Less than 1 day is refused unless ``--force``: a reader or
writer still working on an older version (a running backfill, a Spark job) could lose its files.
This check replaces Delta's own (168 h) check, which is turned off for the call, so 1-7 days
are allowed. ``--dry-run`` lists what a vacuum would delete and changes nothing (no compaction).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RETENTION_HOURS = 7 * 24
MIN_RETENTION_HOURS = 24
DEFAULT_TABLES = ("features", "labels", "dead_letters")


class MaintenanceError(ValueError):
    """Refused (retention too short, no table); the message says how to proceed."""


@dataclass
class TableReport:
    table: str
    path: str
    engine: str
    version_before: int
    version_after: int
    files_before: int          # data files the current version references
    files_after: int
    files_on_disk_before: int  # Parquet files in the folder (referenced or not)
    files_on_disk_after: int
    compacted: bool
    files_added: int = 0
    files_removed: int = 0
    vacuumed: list[str] = field(default_factory=list)
    dry_run: bool = False

    def line(self) -> str:
        vac = f"{'would delete' if self.dry_run else 'deleted'} {len(self.vacuumed)} file(s)"
        comp = (f"compacted {self.files_removed} -> {self.files_added} file(s)" if self.compacted
                else "not compacted")
        return (f"  {self.table:<13} v{self.version_before} -> v{self.version_after}: {comp}; {vac}; "
                f"referenced files {self.files_before} -> {self.files_after}, on disk "
                f"{self.files_on_disk_before} -> {self.files_on_disk_after}  ({self.path})")


def check_retention(hours: float, *, force: bool) -> None:
    if hours < 0:
        raise MaintenanceError("the retention cannot be negative")
    if hours < MIN_RETENTION_HOURS and not force:
        raise MaintenanceError(
            f"a retention of {hours:g} h is under {MIN_RETENTION_HOURS} h: files a running reader or writer still "
            "needs could be deleted, and time travel to recent versions would break. Use --force if no job "
            "touches the table and you accept that")


def files_on_disk(path: str | Path) -> int:
    root = Path(path)
    return sum(1 for p in root.rglob("*.parquet") if "_delta_log" not in p.parts)


def _referenced(path: str) -> tuple[int, int]:
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    return dt.version(), len(dt.file_uris())


def maintain_table(path: str, *, name: str | None = None, engine: str = "local", retention_hours: float,
                   force: bool = False, compact: bool = True, vacuum: bool = True, dry_run: bool = False,
                   target_size: int | None = None, spark: Any = None) -> TableReport:
    """Compact then vacuum one Delta table; returns what changed."""
    from deltalake import DeltaTable

    check_retention(retention_hours, force=force)
    if not DeltaTable.is_deltatable(path):
        raise MaintenanceError(f"{path} is not a Delta table")
    v0, n0 = _referenced(path)
    disk0 = files_on_disk(path)
    rep = TableReport(table=name or Path(path).name, path=str(path), engine=engine, version_before=v0,
                      version_after=v0, files_before=n0, files_after=n0, files_on_disk_before=disk0,
                      files_on_disk_after=disk0, compacted=False, dry_run=dry_run)
    if engine == "local":
        _local(path, rep, retention_hours=retention_hours, compact=compact and not dry_run, vacuum=vacuum,
               dry_run=dry_run, target_size=target_size)
    elif engine == "spark":
        _spark(path, rep, retention_hours=retention_hours, compact=compact and not dry_run, vacuum=vacuum,
               dry_run=dry_run, spark=spark)
    else:
        raise MaintenanceError(f"unknown engine {engine!r}: local or spark")
    rep.version_after, rep.files_after = _referenced(path)
    rep.files_on_disk_after = files_on_disk(path)
    return rep


def _metadata() -> dict[str, str]:
    from finfeat import __version__

    return {"finfeat.operation": "maintain", "finfeat.code_version": __version__}


def _local(path: str, rep: TableReport, *, retention_hours: float, compact: bool, vacuum: bool, dry_run: bool,
           target_size: int | None) -> None:
    from deltalake import CommitProperties, DeltaTable

    if compact:
        metrics = DeltaTable(path).optimize.compact(target_size=target_size,
                                                    commit_properties=CommitProperties(custom_metadata=_metadata()))
        rep.compacted = True
        rep.files_added = int(metrics.get("numFilesAdded", 0))
        rep.files_removed = int(metrics.get("numFilesRemoved", 0))
    if vacuum:
        # finfeat's own retention check ran (check_retention); Delta's 168 h default is not enforced.
        # full: also files no commit ever referenced (a run killed before its commit), as Spark's VACUUM
        rep.vacuumed = sorted(DeltaTable(path).vacuum(
            retention_hours=int(retention_hours), dry_run=dry_run, enforce_retention_duration=False, full=True,
            commit_properties=None if dry_run else CommitProperties(custom_metadata=_metadata())))


def _quote(path: str) -> str:
    return "delta.`" + str(path).replace("`", "``") + "`"


def _spark(path: str, rep: TableReport, *, retention_hours: float, compact: bool, vacuum: bool, dry_run: bool,
           spark: Any) -> None:
    if spark is None:
        from finfeat.jobs.spark.session import get_spark

        spark = get_spark()
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", "finfeat maintain")
    try:
        if compact:
            row = spark.sql(f"OPTIMIZE {_quote(path)}").collect()[0]
            metrics = row["metrics"].asDict() if row["metrics"] is not None else {}
            rep.compacted = True
            rep.files_added = int(metrics.get("numFilesAdded", 0))
            rep.files_removed = int(metrics.get("numFilesRemoved", 0))
        if vacuum:
            before = _disk_files(path)
            hours = f"{retention_hours:g}"
            if dry_run:
                rows = spark.sql(f"VACUUM {_quote(path)} RETAIN {hours} HOURS DRY RUN").collect()
                rep.vacuumed = sorted(_relative(path, r[0]) for r in rows)
            else:
                spark.sql(f"VACUUM {_quote(path)} RETAIN {hours} HOURS").collect()
                rep.vacuumed = sorted(before - _disk_files(path))
    finally:
        spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")


def _disk_files(path: str) -> set[str]:
    root = Path(path)
    return {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}


def _relative(path: str, uri: str) -> str:
    text = uri.removeprefix("file:")
    try:
        return str(Path(text).resolve().relative_to(Path(path).resolve()))
    except ValueError:
        return text


def maintain(warehouse: str | Path, *, tables: list[str] | None = None, **kwargs: Any) -> list[TableReport]:
    """Maintain the named tables (names under ``warehouse`` or paths); default: every finfeat table there."""
    from deltalake import DeltaTable

    check_retention(kwargs.get("retention_hours", DEFAULT_RETENTION_HOURS), force=kwargs.get("force", False))
    targets: list[tuple[str, str]] = []
    for name in tables or DEFAULT_TABLES:
        path = Path(name) if ("/" in name or Path(name).is_absolute()) else Path(warehouse) / name
        if not DeltaTable.is_deltatable(str(path)):
            if tables:
                raise MaintenanceError(f"no Delta table at {path}")
            continue
        targets.append((path.name, str(path)))
    if not targets:
        raise MaintenanceError(f"no Delta tables under {warehouse} (looked for {', '.join(DEFAULT_TABLES)})")
    return [maintain_table(path, name=name, **kwargs) for name, path in targets]


# ----------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("maintain", help="compact small files and vacuum old ones (Delta tables)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    p.add_argument("--table", action="append", dest="tables",
                   help="a table name under the warehouse or a path; repeatable (default: features, labels, "
                        "dead_letters where present)")
    p.add_argument("--engine", choices=["local", "spark"], default="local",
                   help="local (delta-rs, default) or spark (delta-spark OPTIMIZE / VACUUM)")
    ret = p.add_mutually_exclusive_group()
    ret.add_argument("--retention-days", type=float, help="keep unreferenced files this long (default 7)")
    ret.add_argument("--retention-hours", type=float, help="the same in hours")
    p.add_argument("--force", action="store_true", help="allow a retention under 1 day")
    p.add_argument("--dry-run", action="store_true", help="list what a vacuum would delete; change nothing")
    p.add_argument("--no-compact", action="store_true", help="vacuum only")
    p.add_argument("--no-vacuum", action="store_true", help="compact only")
    p.add_argument("--target-size", type=int, help="target file size in bytes for compaction (local engine)")
    return p


def run(args: argparse.Namespace) -> int:
    hours = (args.retention_hours if args.retention_hours is not None
             else args.retention_days * 24 if args.retention_days is not None else DEFAULT_RETENTION_HOURS)
    try:
        check_retention(hours, force=args.force)
        spark = None
        if args.engine == "spark":
            from finfeat.jobs.spark.session import SparkSetupError, get_spark

            try:
                spark = get_spark()
            except SparkSetupError as exc:
                raise MaintenanceError(str(exc)) from None
        reports = maintain(args.warehouse, tables=args.tables, engine=args.engine, retention_hours=hours,
                           force=args.force, compact=not args.no_compact, vacuum=not args.no_vacuum,
                           dry_run=args.dry_run, target_size=args.target_size, spark=spark)
    except MaintenanceError as exc:
        print(f"finfeat maintain: error: {exc}", file=sys.stderr)
        return 2
    print(f"maintain ({args.engine}, retention {hours:g} h{', dry run' if args.dry_run else ''}):")
    for rep in reports:
        print(rep.line())
    return 0


def report_dicts(reports: list[TableReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]
