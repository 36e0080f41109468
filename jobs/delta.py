"""Delta Lake tables written with delta-rs: features (partition overwrite), labels (merge), dead
letters and quarantined rows (replaced per run key), and the run reports.

Every write is safe against a concurrent backfill: a table is created by one atomic commit of
version 0 that exactly one writer wins (delta-rs would otherwise retry a losing create as an
append), every later write replaces rows under a predicate, and a writer that loses a commit race
(``CommitFailedError``) re-reads the table and tries again, a bounded number of times with
randomized exponential backoff.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, create_table_with_add_actions
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.features import PARTITION_COLUMN

_LOG = logging.getLogger(__name__)

FEATURES = "features"
DEAD_LETTERS = "dead_letters"
LABELS = "labels"
RUNS = "_runs"
#: Column of the dead-letter and quarantine tables: the key of the run's inputs and range
#: (:func:`run_key`); a rerun replaces the rows of an earlier run with the same key.
RUN_KEY = "run_key"
#: Tries of one commit before a run gives up on a table that other writers keep changing.
COMMIT_ATTEMPTS = 12
#: Upper bound of one backoff wait, seconds (the waits are random, exponential, from 0.1 s).
COMMIT_MAX_WAIT_S = 8.0

#: run reports: owner read-write, group read at most, never others (whatever the umask)
REPORT_MODE = 0o640

T = TypeVar("T")


class CommitConflict(RuntimeError):
    """Other writers kept committing to the same table through every retry; nothing of this
    commit landed. Rerun the backfill: it replaces what it writes, so a rerun is safe."""


class ShrinkRefused(RuntimeError):
    """The commit would replace partitions that hold rows with empty ones or with far fewer rows."""


class WarehouseError(ValueError):
    """The warehouse path cannot hold the output (a file, unwritable); found before any input is read."""


def table_path(warehouse: str | Path, name: str) -> str:
    return str(Path(warehouse) / name)


def run_key(*, inputs: list[Path], labels: list[Path], start: date, end: date) -> str:
    """The identity of a run's inputs and range: the sorted absolute input and label paths and the
    dates. The same backfill run again (after a kill, by a second scheduler) has the same key."""
    ident = {"inputs": sorted(str(Path(p).resolve()) for p in inputs),
             "labels": sorted(str(Path(p).resolve()) for p in labels),
             "start": start.isoformat(), "end": end.isoformat()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def check_warehouse(warehouse: str | Path) -> Path:
    """Make sure ``warehouse`` is (or can become) a writable folder whose table paths are folders.

    Creates it if missing. Raises :class:`WarehouseError` with what to do otherwise.
    """
    path = Path(warehouse)
    if path.exists() and not path.is_dir():
        raise WarehouseError(f"--warehouse {path} is a file, not a folder; name a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WarehouseError(f"--warehouse {path}: a part of this path is a file; name a folder") from None
    except PermissionError:
        raise WarehouseError(f"--warehouse {path} cannot be created (permission denied); name a folder "
                             "you can write to") from None
    for name in (FEATURES, DEAD_LETTERS, LABELS, RUNS, "quarantine"):
        child = path / name
        if child.exists() and not child.is_dir():
            raise WarehouseError(f"--warehouse {path}: {child} is a file where the {name} table goes; "
                                 "move it away or name another warehouse")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".finfeat-write-check-"):
            pass
    except OSError as exc:
        raise WarehouseError(f"--warehouse {path} is not writable ({exc.strerror}); name a folder you can "
                             "write to") from None
    return path


def _commit(what: str, path: str, attempt: Callable[[], T], races: list[str] | None) -> T:
    """Run ``attempt`` (which re-reads the table) until it commits, retrying lost commit races.

    Each lost race is logged and, if ``races`` is given, appended to it (for the run report).
    """
    def lost(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        _LOG.warning("%s: a concurrent writer committed to %s first (%s); retry %d of %d in %.1f s", what, path,
                     str(exc).splitlines()[0] if exc else "?", state.attempt_number, COMMIT_ATTEMPTS - 1, wait)
        if races is not None:
            races.append(what)

    retrying = Retrying(stop=stop_after_attempt(COMMIT_ATTEMPTS),
                        wait=wait_random_exponential(multiplier=0.1, max=COMMIT_MAX_WAIT_S),
                        retry=retry_if_exception_type(CommitFailedError), before_sleep=lost, reraise=True)
    try:
        return retrying(attempt)
    except CommitFailedError as exc:
        raise CommitConflict(f"{what}: {COMMIT_ATTEMPTS} commits to {path} lost to concurrent writers "
                             f"(last: {str(exc).splitlines()[0]}); nothing of this commit landed, rerun "
                             "the backfill") from exc


def _create(path: str, table: pa.Table, *, partition_by: list[str], metadata: dict[str, str],
            races: list[str] | None) -> bool:
    """Create the table with ``table`` as version 0 if no table is there; False if one is (or if
    another writer created it first: delta-rs would retry a lost create as an append)."""
    if DeltaTable.is_deltatable(path):
        return False
    try:
        write_deltalake(path, table, partition_by=partition_by, mode="error",
                        commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0))
    except (CommitFailedError, DeltaError):
        if DeltaTable.is_deltatable(path):
            _LOG.warning("%s was created by a concurrent writer first; replacing under a predicate", path)
            if races is not None:
                races.append(f"create {Path(path).name}")
            return False
        raise
    return True


def partition_counts(table: DeltaTable, *, start: date, end: date) -> dict[date, int]:
    """Rows per ``event_date`` in ``[start, end]`` as the Delta log's file statistics count them."""
    actions = pa.table(table.get_add_actions(flatten=True))
    column = f"partition.{PARTITION_COLUMN}"
    counts: dict[date, int] = {}
    if actions.num_rows == 0 or column not in actions.column_names:
        return counts
    for day, n in zip(actions.column(column).to_pylist(), actions.column("num_records").to_pylist()):
        if day is not None and start <= day <= end:
            counts[day] = counts.get(day, 0) + (n or 0)
    return counts


def _day_counts(rows: pa.Table) -> dict[date, int]:
    new: dict[date, int] = {}
    if rows.num_rows:
        for day, n in zip(*pc.value_counts(rows.column(PARTITION_COLUMN)).flatten()):
            new[day.as_py()] = n.as_py()
    return new


def _check_shrink(table: DeltaTable, new: dict[date, int], *, start: date, end: date) -> None:
    held = partition_counts(table, start=start, end=end)
    if not held:
        return
    emptied = sorted(d for d, n in held.items() if n and not new.get(d))
    before, after = sum(held.values()), sum(new.values())
    if emptied or after * 2 < before:
        days = (f"; {len(emptied)} partition(s) that hold rows would become empty: "
                + ", ".join(d.isoformat() for d in emptied[:5]) + (" ..." if len(emptied) > 5 else "")) if emptied else ""
        raise ShrinkRefused(
            f"this run would replace the {before:,} feature rows of {start}..{end} with {after:,}{days}. "
            "Nothing was committed. If the source really lost those rows, rerun with --allow-shrink; otherwise "
            "check the inputs, the mapping and --start/--end")


def overwrite_partitions(path: str, table: pa.Table, *, start: date, end: date, metadata: dict[str, str],
                         allow_shrink: bool = False, races: list[str] | None = None) -> int:
    """Replace every ``event_date`` partition in ``[start, end]`` with ``table`` in one commit.

    Rows outside the range are refused; running the same write twice leaves the same content.
    Unless ``allow_shrink``, a commit that would leave a partition empty that holds rows, or the
    range with fewer than half its rows, raises :class:`ShrinkRefused` and commits nothing.
    """
    if table.num_rows:
        days = table.column(PARTITION_COLUMN)
        lo, hi = pc.min(days).as_py(), pc.max(days).as_py()
        if lo < start or hi > end:
            raise ValueError(f"feature rows span {lo}..{hi}, outside the backfill range {start}..{end}")
    predicate = f"{PARTITION_COLUMN} >= '{start.isoformat()}' AND {PARTITION_COLUMN} <= '{end.isoformat()}'"

    def attempt() -> int:
        if _create(path, table, partition_by=[PARTITION_COLUMN], metadata=metadata, races=races):
            return 0
        current = DeltaTable(path)
        if not allow_shrink:
            _check_shrink(current, _day_counts(table), start=start, end=end)
        write_deltalake(current, table, partition_by=[PARTITION_COLUMN], mode="overwrite", predicate=predicate,
                        schema_mode="merge", commit_properties=CommitProperties(custom_metadata=metadata))
        return DeltaTable(path).version()

    return _commit("features", path, attempt, races)


@dataclass(frozen=True)
class DataFile:
    """A Parquet file written into a table's folder but not committed yet (no reader sees it):
    what its Delta add action says, and its rows."""

    path: str                      # relative to the table's folder
    size: int
    partition_values: dict[str, str]
    modification_time: int         # ms since the epoch
    stats: str                     # the add action's JSON statistics
    rows: int

    def add_action(self) -> AddAction:
        return AddAction(self.path, self.size, self.partition_values, self.modification_time, True, self.stats)


#: column types whose Parquet min/max go into the add action as they are (others: counts only)
_STATS_TYPES = (pa.types.is_integer, pa.types.is_date32, pa.types.is_string)


def _file_stats(meta: pq.FileMetaData, schema: pa.Schema) -> str:
    """Delta statistics of one written file from its Parquet footer: rows, null counts, and the
    min/max of integer, date and string columns (readers use them to skip files)."""
    nulls: dict[str, int] = {}
    lo: dict[str, object] = {}
    hi: dict[str, object] = {}
    for i, field in enumerate(schema):
        keep_range = any(test(field.type) for test in _STATS_TYPES)
        n, mins, maxs = 0, [], []
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(i).statistics
            if st is None:
                keep_range, n = False, None
                break
            n += st.null_count if st.has_null_count else 0
            if st.has_min_max:
                mins.append(st.min)
                maxs.append(st.max)
        if n is not None:
            nulls[field.name] = n
        if keep_range and mins:
            lo[field.name], hi[field.name] = min(mins), max(maxs)
    as_text = lambda v: v.isoformat() if isinstance(v, date) else v  # noqa: E731
    return json.dumps({"numRecords": meta.num_rows, "nullCount": nulls,
                       "minValues": {k: as_text(v) for k, v in lo.items()},
                       "maxValues": {k: as_text(v) for k, v in hi.items()}})


def write_data_files(path: str, table: pa.Table, *, partition: str = PARTITION_COLUMN, prefix: str) -> list[DataFile]:
    """Write ``table`` into ``path`` as one Parquet file per value of its date column ``partition``
    (``partition=YYYY-MM-DD/part-<prefix>-<uuid>.parquet``, without that column, as Delta lays
    partitions out), uncommitted. Commit them with :func:`commit_data_files`; until then, and if
    the run dies first, no reader sees them (a vacuum deletes such files)."""
    if table.num_rows == 0:
        return []
    days = table.column(partition).cast(pa.int32()).to_numpy()
    data = table.drop_columns([partition])
    if len(days) > 1 and (days[1:] < days[:-1]).any():
        order = np.argsort(days, kind="stable")
        days, data = days[order], data.take(pa.array(order))
    cuts = np.flatnonzero(np.diff(days)) + 1
    bounds = np.concatenate([[0], cuts, [len(days)]])
    out: list[DataFile] = []
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        day = (date(1970, 1, 1) + timedelta(days=int(days[s]))).isoformat()
        rel = f"{partition}={day}/part-{prefix}-{uuid.uuid4().hex}.snappy.parquet"
        full = os.path.join(path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        collected: list[pq.FileMetaData] = []
        pq.write_table(data.slice(s, e - s), full, compression="snappy", metadata_collector=collected)
        st = os.stat(full)
        out.append(DataFile(path=rel, size=st.st_size, partition_values={partition: day},
                            modification_time=int(st.st_mtime * 1000), stats=_file_stats(collected[0], data.schema),
                            rows=e - s))
    return out


def read_data_file(path: str, f: DataFile, schema: pa.Schema) -> pa.Table:
    """The rows of one uncommitted file with its partition column, in ``schema``'s column order."""
    rows = pq.read_table(os.path.join(path, f.path))
    for name, value in f.partition_values.items():
        rows = rows.append_column(name, pa.array([date.fromisoformat(value)] * rows.num_rows, pa.date32()))
    return rows.select(schema.names).cast(schema)


def discard_data_files(path: str, files: list[DataFile]) -> None:
    """Delete files written for a commit that did not happen (best effort); a file the table's
    current version references (the commit landed after all) is kept."""
    if not files:
        return
    held: set[str] = set()
    try:
        if DeltaTable.is_deltatable(path):
            held = set(pa.table(DeltaTable(path).get_add_actions(flatten=True)).column("path").to_pylist())
    except (DeltaError, OSError) as exc:
        _LOG.warning("%s: cannot read the table (%s); its uncommitted files stay until a vacuum", path, exc)
        return
    for f in files:
        if f.path in held:
            continue
        try:
            os.unlink(os.path.join(path, f.path))
        except OSError:
            pass


def commit_data_files(path: str, files: list[DataFile], *, schema: pa.Schema, start: date, end: date,
                      metadata: dict[str, str], allow_shrink: bool = False,
                      races: list[str] | None = None) -> int:
    """Replace every ``event_date`` partition in ``[start, end]`` with ``files`` in one commit.

    What :func:`overwrite_partitions` does for a table, for files the workers already wrote:
    the same range check, shrink guard, create-or-replace and retries of lost races. The files
    are committed by their add actions (``create_table_with_add_actions`` for a new table,
    ``create_write_transaction`` in overwrite mode under the range's partition filters).
    """
    new: dict[date, int] = {}
    for f in files:
        day = date.fromisoformat(f.partition_values[PARTITION_COLUMN])
        if not start <= day <= end:
            raise ValueError(f"feature rows on {day}, outside the backfill range {start}..{end}")
        new[day] = new.get(day, 0) + f.rows
    adds = [f.add_action() for f in files]
    props = CommitProperties(custom_metadata=metadata, max_commit_retries=0)
    filters = [(PARTITION_COLUMN, ">=", start.isoformat()), (PARTITION_COLUMN, "<=", end.isoformat())]

    def attempt() -> int:
        if not DeltaTable.is_deltatable(path):
            try:
                create_table_with_add_actions(path, Schema.from_arrow(schema), adds, mode="error",
                                              partition_by=[PARTITION_COLUMN], commit_properties=props)
                return 0
            except (CommitFailedError, DeltaError):
                if not DeltaTable.is_deltatable(path):
                    raise
                _LOG.warning("%s was created by a concurrent writer first; replacing its partitions", path)
                if races is not None:
                    races.append(f"create {Path(path).name}")
        current = DeltaTable(path)
        if not allow_shrink:
            _check_shrink(current, new, start=start, end=end)
        current.create_write_transaction(adds, mode="overwrite", schema=schema, partition_by=[PARTITION_COLUMN],
                                         partition_filters=filters, commit_properties=props)
        return DeltaTable(path).version()

    return _commit("features", path, attempt, races)


def replace_run_rows(path: str, table: pa.Table, *, key: str, partition_by: list[str],
                     metadata: dict[str, str], create_empty: bool = False,
                     races: list[str] | None = None) -> int | None:
    """Replace the rows of ``path`` whose :data:`RUN_KEY` is ``key`` with ``table`` in one commit.

    Dead letters and quarantined rows are written this way: a rerun of the same inputs and range
    (after a kill, or a second scheduler) replaces the rows of the earlier run instead of adding
    them twice. A table without the column gains it (older rows keep a null key). With no rows
    and no table, a table is created only if ``create_empty``; the table's version, or None.
    """
    table = table.append_column(pa.field(RUN_KEY, pa.string()), pa.array([key] * table.num_rows, pa.string()))
    predicate = f"{RUN_KEY} = '{key}'"

    def attempt() -> int | None:
        if not DeltaTable.is_deltatable(path) and table.num_rows == 0 and not create_empty:
            return None
        if _create(path, table, partition_by=partition_by, metadata=metadata, races=races):
            return 0
        current = DeltaTable(path)
        fields = {f.name for f in current.schema().fields}
        if RUN_KEY not in fields:
            # older tables: add the column with an empty commit before a predicate can name it
            write_deltalake(current, table.schema.empty_table(), partition_by=partition_by, mode="append",
                            schema_mode="merge", commit_properties=CommitProperties(custom_metadata=metadata))
            current = DeltaTable(path)
        elif table.num_rows == 0:
            held = current.to_pyarrow_dataset().count_rows(filter=pc.field(RUN_KEY) == key)
            if held == 0:
                return current.version()
        write_deltalake(current, table, partition_by=partition_by, mode="overwrite", predicate=predicate,
                        schema_mode="merge", commit_properties=CommitProperties(custom_metadata=metadata))
        return DeltaTable(path).version()

    return _commit(Path(path).name, path, attempt, races)


def replace_dead_letters(path: str, table: pa.Table, *, key: str, metadata: dict[str, str],
                         races: list[str] | None = None) -> int | None:
    """The run's dead letters, replacing those of an earlier run of the same inputs and range."""
    return replace_run_rows(path, table.cast(DEAD_LETTER_SCHEMA), key=key, partition_by=["recorded_date"],
                            metadata=metadata, create_empty=True, races=races)


def upsert_labels(path: str, table: pa.Table, *, metadata: dict[str, str],
                  races: list[str] | None = None) -> int | None:
    """Merge label rows by txn id: a feed's label replaces one that came with the event; the
    same rows merged twice change nothing."""
    from finfeat.schemas.labels import LABEL_SCHEMA

    table = table.cast(LABEL_SCHEMA)

    def attempt() -> int | None:
        if table.num_rows == 0:
            return DeltaTable(path).version() if DeltaTable.is_deltatable(path) else None
        if _create(path, table, partition_by=["label_date"], metadata=metadata, races=races):
            return 0
        (DeltaTable(path)
         .merge(table, predicate="t.txn_id = s.txn_id", source_alias="s", target_alias="t",
                commit_properties=CommitProperties(custom_metadata=metadata))
         .when_matched_update_all(predicate="s.source <> 'events' OR t.source = 'events'")
         .when_not_matched_insert_all()
         .execute())
        return DeltaTable(path).version()

    return _commit("labels", path, attempt, races)


# ----------------------------------------------------------------------------------- run reports


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), to tell a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_identity() -> dict[str, object]:
    """Who is running: host, pid and the pid's start time (see :func:`mark_interrupted_runs`)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


def _alive(report: dict[str, object]) -> bool | None:
    """True or False for a run of this host, None when it ran elsewhere (cannot be told)."""
    if report.get("host") != socket.gethostname() or not isinstance(report.get("pid"), int):
        return None
    pid = int(report["pid"])  # type: ignore[arg-type]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or started == report.get("pid_start")


def write_run_report(warehouse: str | Path, report: dict[str, object]) -> Path:
    """Write ``_runs/<run_id>.json`` atomically (a kill leaves the old report or the new one)."""
    folder = Path(warehouse) / RUNS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{report['run_id']}.json"
    report["report_path"] = str(path)
    tmp = folder / f".{report['run_id']}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, REPORT_MODE)  # the umask may narrow it
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(report, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_run_report(warehouse: str | Path, run_id: str) -> dict[str, object] | None:
    path = Path(warehouse) / RUNS / f"{run_id}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def update_run_report(warehouse: str | Path, run_id: str, /, **changes: object) -> dict[str, object]:
    """Merge ``changes`` into the run's report and write it; ``committed`` entries are added, not replaced."""
    report = read_run_report(warehouse, run_id) or {"run_id": run_id}
    committed = dict(report.get("committed") or {})  # type: ignore[arg-type]
    committed.update(changes.pop("committed", None) or {})  # type: ignore[arg-type]
    report.update(changes)
    report["committed"] = committed
    report["updated_at"] = datetime.now(timezone.utc).isoformat()
    write_run_report(warehouse, report)
    return report


def mark_interrupted_runs(warehouse: str | Path) -> list[str]:
    """Mark reports of runs on this host that say "running" but whose process is gone as
    "interrupted"; the run ids marked. Reports of other hosts are left as they are."""
    folder = Path(warehouse) / RUNS
    marked: list[str] = []
    if not folder.is_dir():
        return marked
    for path in sorted(folder.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if report.get("status") == "running" and _alive(report) is False:
            report["status"] = "interrupted"
            report["interrupted_found_at"] = datetime.now(timezone.utc).isoformat()
            write_run_report(warehouse, report)
            marked.append(str(report.get("run_id")))
            _LOG.warning("run %s died before it finished (committed: %s); its report now says interrupted",
                         report.get("run_id"), ", ".join(report.get("committed") or {}) or "nothing")
    return marked


def read_table(path: str | Path, *, columns: list[str] | None = None, filters: object = None,
               version: int | None = None) -> pa.Table:
    """A Delta table (or a version of it) as one Arrow table.

    Reads through a single-threaded dataset scan rather than ``DeltaTable.to_pyarrow_table()``,
    whose threaded scan can leave Arrow threads behind that abort the interpreter at exit
    ("terminate called without an active exception", cf. delta-io/delta-rs#2184).
    ``filters`` is a pyarrow compute expression.
    """
    table = DeltaTable(str(path), version=version)
    return table.to_pyarrow_dataset().to_table(columns=columns, filter=filters, use_threads=False)
