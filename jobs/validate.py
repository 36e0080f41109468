"""``finfeat validate``: data-quality checks of a Delta table for CI.

Runs an expectation suite against a Delta table (its latest version, ``--version N``, and/or the
``event_date`` partitions ``--start..--end``), optionally compares every feature's distribution
with a reference (``--reference-version`` and/or ``--reference-start/--reference-end``) by the
population stability index, prints a short table of results and its verdict (passed, passed with
warnings, failed), writes GX Data Docs (self-contained pages) and a summary page to ``--docs DIR``,
and exits 0 (passed, warnings allowed), 1 (checks failed) or 2 (usage error: bad flags, no such
table, version or rows).

Checks that fail: a broken ``fail`` expectation, an expectation that cannot be evaluated, rows
that a ``drop`` expectation would quarantine above ``--max-quarantine-fraction`` (default 0: the
pipeline quarantines such rows before it commits, so a committed table should have none), a PSI
at or above ``--psi-fail``. ``warn`` expectations and a PSI at or above ``--psi-warn`` are reported
and do not fail.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PARTITION_COLUMN = "event_date"


from finfeat.jobs.argtypes import delta_version as _version
from finfeat.jobs.argtypes import iso_date as _date


class _Usage(Exception):
    """A usage or configuration error: exit code 2."""






def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``validate`` on a ``finfeat`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser(
        "validate", help="data-quality checks of a Delta table: expectation suite and drift (for CI)",
        description=__doc__.split("\n\n")[1] if __doc__ else None, allow_abbrev=False)
    p.add_argument("--table", required=True, help="path of the Delta table, e.g. warehouse/features")
    p.add_argument("--suite", default="features",
                   help="suite: a built-in name (features, events) or a suite YAML file (default features)")
    sel = p.add_argument_group("rows to check (default: the whole latest version)")
    sel.add_argument("--version", type=_version, help="the table version to check (default latest)")
    sel.add_argument("--start", type=_date, help=f"first {PARTITION_COLUMN} partition, inclusive")
    sel.add_argument("--end", type=_date, help=f"last {PARTITION_COLUMN} partition, inclusive")
    ref = p.add_argument_group("drift: population stability index per feature against a reference")
    ref.add_argument("--reference-table", help="Delta table of the reference (default: --table)")
    ref.add_argument("--reference-version", type=_version, help="reference table version")
    ref.add_argument("--reference-start", type=_date, help=f"first reference {PARTITION_COLUMN}, inclusive")
    ref.add_argument("--reference-end", type=_date, help=f"last reference {PARTITION_COLUMN}, inclusive")
    ref.add_argument("--psi-warn", type=_non_negative, default=0.1, help="PSI that warns (default 0.1)")
    ref.add_argument("--psi-fail", type=_non_negative, default=0.25, help="PSI that fails (default 0.25)")
    ref.add_argument("--psi-columns", help="comma-separated columns (default: the v1 features in both tables "
                                           "except the calendar ones: hour_of_day, day_of_week, is_weekend)")
    p.add_argument("--max-quarantine-fraction", type=_fraction, default=0.0,
                   help="largest share of rows a drop expectation may reject before the check fails (default 0)")
    p.add_argument("--missing-columns", choices=["fail", "skip"], default="fail",
                   help="an expectation on a column the table lacks fails (default) or is skipped")
    p.add_argument("--docs", help="folder for GX Data Docs (gx/uncommitted/data_docs/local_site/index.html) "
                                  "and a summary page (index.html, report.json)")
    p.set_defaults(run=run)
    return p


@dataclass(frozen=True)
class _Selection:
    table: str
    version: int | None
    start: date | None
    end: date | None

    def label(self) -> str:
        rng = f"{PARTITION_COLUMN} {self.start}..{self.end}" if self.start else "all partitions"
        return f"{self.table} @ version {self.version}, {rng}"


def _selection(table: str, version: int | None, start: date | None, end: date | None, what: str) -> _Selection:
    if (start is None) != (end is None):
        raise _Usage(f"give both {what}start and {what}end (inclusive {PARTITION_COLUMN} range), or neither")
    if start and end and end < start:
        raise _Usage(f"{what}end {end} is before {what}start {start}")
    return _Selection(table, version, start, end)


def _read(sel: _Selection) -> tuple[Any, _Selection]:
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    if not DeltaTable.is_deltatable(sel.table):
        raise _Usage(f"{sel.table} is not a Delta table (no _delta_log); give --table with a Delta table path")
    try:
        dt = DeltaTable(sel.table, version=sel.version) if sel.version is not None else DeltaTable(sel.table)
    except (DeltaError, TableNotFoundError) as exc:
        latest = DeltaTable(sel.table).version()
        raise _Usage(f"{sel.table} has no version {sel.version} (latest is {latest}): "
                     f"{str(exc).splitlines()[0]}") from None
    version = dt.version()
    where = None
    if sel.start is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        names = [f.name for f in dt.schema().fields]
        if PARTITION_COLUMN not in names:
            raise _Usage(f"{sel.table} has no {PARTITION_COLUMN} column; drop --start/--end")
        day = pc.field(PARTITION_COLUMN)
        where = (day >= pa.scalar(sel.start, pa.date32())) & (day <= pa.scalar(sel.end, pa.date32()))
    # Not DeltaTable.to_pyarrow_table(): its threaded scan leaves Arrow threads behind that make
    # the interpreter abort at exit now and then ("terminate called without an active exception",
    # exit 134; cf. delta-io/delta-rs#2184), which would turn a passed CI check into a failed one.
    table = dt.to_pyarrow_dataset().to_table(filter=where, use_threads=False)
    return table, _Selection(sel.table, version, sel.start, sel.end)


def run(args: argparse.Namespace) -> int:
    """Run the checks; the exit code (0 passed, 1 checks failed, 2 usage error)."""
    try:
        return _run(args)
    except _Usage as exc:
        print(f"finfeat validate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from finfeat.validation.suite import Suite, SuiteError

    if args.psi_warn > args.psi_fail:
        raise _Usage(f"--psi-warn {args.psi_warn} is above --psi-fail {args.psi_fail}")
    target = _selection(args.table, args.version, args.start, args.end, "--")
    has_ref = any(v is not None for v in (args.reference_table, args.reference_version, args.reference_start,
                                          args.reference_end))
    reference = (_selection(args.reference_table or args.table, args.reference_version, args.reference_start,
                            args.reference_end, "--reference-") if has_ref else None)
    try:
        suite = Suite.load(args.suite)
    except SuiteError as exc:
        raise _Usage(str(exc)) from None

    table, target = _read(target)
    if table.num_rows == 0:
        raise _Usage(f"no rows to check in {target.label()}; check --version / --start / --end")

    from finfeat.validation.docs import verdict_of
    from finfeat.validation.validate import QuarantinePolicy, validate_table

    outcome = validate_table(table, suite, policy=QuarantinePolicy(args.max_quarantine_fraction),
                             missing_columns=args.missing_columns)
    failures = list(outcome.failures)

    drift: list[Any] = []
    ref_label = None
    if reference is not None:
        from finfeat.transforms.spec import FeatureSpec
        from finfeat.validation.drift import drift_columns, drift_report

        ref_table, reference = _read(reference)
        ref_label = reference.label()
        if ref_table.num_rows == 0:
            raise _Usage(f"no reference rows in {ref_label}")
        # calendar features (hour, weekday) follow the dates selected, not the data: left out by default
        wanted = ([c.strip() for c in args.psi_columns.split(",") if c.strip()] if args.psi_columns
                  else [f.name for f in FeatureSpec.default().features if f.entity != "event"])
        columns = drift_columns(ref_table, table, wanted)
        if args.psi_columns:
            absent = [c for c in wanted if c not in columns]
            if absent:
                raise _Usage(f"--psi-columns {', '.join(absent)}: not in both tables")
        if not columns:
            columns = drift_columns(ref_table, table)
        drift = drift_report(ref_table, table, columns, warn=args.psi_warn, fail=args.psi_fail)
        failures += [f"drift[{d.column}]: PSI {d.psi:.4f} >= --psi-fail {args.psi_fail}"
                     for d in drift if d.status == "fail"]

    code = EXIT_FAILED if failures else EXIT_OK
    verdict = verdict_of(failures=failures, outcome=outcome, drift=drift)
    data_docs = None
    if args.docs:
        from finfeat.validation.docs import build_data_docs, report_dict, write_summary

        runnable = suite if args.missing_columns == "fail" else suite.restricted_to(table.column_names)[0]
        writer = _writer_run_id(target)
        data_docs = (build_data_docs(table, runnable, args.docs, verdict=verdict,
                                     asset=f"{suite.name}: {target.label()}",
                                     run_name=writer or f"{Path(target.table).name}@v{target.version}",
                                     run_id=writer) if runnable.rules else None)
        report = report_dict(target={"table": target.table, "version": target.version,
                                     "selection": target.label(), "reference": ref_label},
                             outcome=outcome, drift=drift, exit_code=code, failures=failures, data_docs=data_docs)
        summary_page = write_summary(args.docs, report)
    _print(target, suite.name, outcome, drift, failures, ref_label, verdict)
    if args.docs:
        print(f"  report             {summary_page}")
        if data_docs:
            print(f"  GX Data Docs       {data_docs}")
    return code


def _writer_run_id(sel: _Selection) -> str | None:
    """The ``finfeat.run_id`` of the commit that made the selected version (None if it has none)."""
    from deltalake import DeltaTable

    for entry in DeltaTable(sel.table).history():
        if entry.get("version") == sel.version:
            run_id = entry.get("finfeat.run_id")
            return str(run_id) if run_id else None
    return None


def _print(target: _Selection, suite: str, outcome: Any, drift: list[Any], failures: list[str],
           ref_label: str | None, verdict: str) -> None:
    from finfeat.validation.docs import VERDICT_LABEL

    results = outcome.results
    broken = [r for r in results if r.broken or r.error]
    lines = ["", f"finfeat validate {target.label()}: {outcome.rows:,} rows, suite {suite} "
                 f"({len(results)} expectations, {outcome.seconds:.2f} s)"]
    if broken:
        lines.append(f"  {'expectation':<44}{'policy':<8}{'result':<12}{'rows':>10}")
        for r in broken:
            state = ("error" if r.error else "skipped" if r.skipped
                     else {"warn": "warn", "drop": "quarantine", "fail": "FAIL"}[r.policy])
            n = "" if r.unexpected_count is None else f"{r.unexpected_count:,}"
            lines.append(f"  {r.name:<44}{r.policy:<8}{state:<12}{n:>10}")
    met = sum(1 for r in results if not r.broken and not r.error and not r.skipped)
    lines.append(f"  {met} of {len(results)} expectations met; {outcome.quarantined.num_rows:,} row(s) would be "
                 f"quarantined; warnings: {sum(outcome.warnings.values()):,} row(s)")
    if drift:
        lines.append(f"  drift against {ref_label}")
        shown = [d for d in drift if d.status != "ok"]
        for d in shown:
            lines.append(f"    {d.column:<42}PSI {d.psi:>8.4f}  {d.status.upper()}")
        top = max(drift, key=lambda d: d.psi)
        lines.append(f"    {len(drift) - len(shown)} of {len(drift)} features stable (max PSI {top.psi:.4f}, "
                     f"{top.column})")
    lines.append(f"  {VERDICT_LABEL[verdict]}" + (":" if failures else ""))
    lines += [f"    {f}" for f in failures]
    print("\n".join(lines))
