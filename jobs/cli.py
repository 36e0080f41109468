"""``finfeat``: point-in-time fraud features: generate, backfill, validate, serve, stream, train, score.

finfeat's own flags are parsed here; everything else is handed to Beam untouched
(``--runner``, ``--direct_num_workers``, ``--setup_file``, ...), after a check that Beam
knows it, so a typo fails at once instead of being dropped with a warning.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import date
from pathlib import Path

from finfeat.jobs.argtypes import fraction as _fraction, iso_date as _date, positive_int as _positive
from finfeat.jobs.options import DEFAULT_MAX_EVENTS_PER_SLICE, DEFAULT_RUNNER, DEMO_TOKEN_KEY, TOKEN_KEY_ENV, UsageError, check_token_key  # noqa: F401
from finfeat.jobs.options import beam_args as _beam_args, token_key as _token_key

_LOG = logging.getLogger(__name__)

#: the umask of every command: outputs (Delta tables, dead letters, run reports, SQLite stores,
#: models) are readable by their owner and group, never by others
OUTPUT_UMASK = 0o027
#: sub-commands whose module holds both the parser and the command, in help order, with the
#: one-line help their ``add_parser`` gives (so ``finfeat --help`` lists them without importing
#: them: some import Beam, Kafka or xgboost; a test keeps the two texts equal).
_LATE_COMMANDS = {
    "training-set": "finfeat.jobs.training", "maintain": "finfeat.jobs.maintain",
    "train": "finfeat.jobs.train", "score": "finfeat.jobs.score", "explain": "finfeat.jobs.explain",
    "audit": "finfeat.jobs.audit",
    "serve": "finfeat.jobs.serve", "features": "finfeat.jobs.discover", "init": "finfeat.jobs.project",
    "produce": "finfeat.jobs.produce", "stream": "finfeat.jobs.stream",
    "serve-lookup": "finfeat.jobs.serve_lookup", "store-labels": "finfeat.jobs.store_labels",
    "validate": "finfeat.jobs.validate",
}
LATE_COMMAND_HELP = {
    "training-set": "features joined with the labels known at a cut-off, pinned to Delta versions; or your own rows, point in time (--entities)",
    "maintain": "compact small files and vacuum old ones (Delta tables)",
    "train": "train an xgboost fraud model on time windows, with a baseline",
    "score": "score transactions with a trained model (batch or one JSON)",
    "explain": "one decision's reason codes as a waterfall chart (PNG)",
    "audit": "check the audit trail of decisions, or find a decision",
    "serve": "serve online features (and scores) over HTTP",
    "features": "list the feature spec's features, or describe one",
    "init": "write a finfeat.yaml project file here",
    "produce": "publish transactions (or labels: --labels) to a Kafka topic as JSON",
    "stream": "Kafka -> features -> Delta (and the online store), exactly once",
    "serve-lookup": "look a candidate transaction up in the online store (prints JSON)",
    "store-labels": "write labels (files or a Kafka topic) to the online store, for label-aware features",
    "validate": "data-quality checks of a Delta table: expectation suite and drift (for CI)",
}


def restrict_umask() -> None:
    """Outputs are not world-readable: files 0640, folders 0750 (or stricter, if the umask already is)."""
    current = os.umask(OUTPUT_UMASK)
    os.umask(current | OUTPUT_UMASK)


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not a flag), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; of the late commands only ``command``'s is complete (the others list
    their help line), so that ``finfeat --help`` or a bad flag imports none of them."""
    parser = argparse.ArgumentParser(prog="finfeat", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log finfeat's progress at INFO (-vv: every library's too)")
    parser.add_argument("--version", action="version", version=f"finfeat {_version()}")
    parser.add_argument("--config", metavar="PATH", help="project file (default ./finfeat.yaml when present; "
                                                         "flags override it)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write seeded synthetic transactions with fraud patterns",
                         allow_abbrev=False)
    gen.add_argument("--out", required=True, help="output file ending in .parquet or .jsonl")
    gen.add_argument("--events", type=_positive, default=1_000_000)
    gen.add_argument("--seed", type=int, default=7)
    gen.add_argument("--start", type=_date, default=date(2024, 1, 1))
    gen.add_argument("--days", type=_positive, default=60)
    gen.add_argument("--cards", type=_positive)
    gen.add_argument("--merchants", type=_positive)
    gen.add_argument("--fraud-rate", type=float, default=0.01)
    gen.add_argument("--time-resolution", choices=["us", "s"], default="s")

    bf = sub.add_parser("backfill", help="compute features for a date range into Delta Lake",
                        description="Any flag not listed here is passed to Beam (e.g. --runner, "
                                    "--direct_num_workers); the default runner is the local FnApiRunner.",
                        allow_abbrev=False)
    bf.add_argument("--input", action="append", required=True, help="a file or folder; repeatable")
    bf.add_argument("--mapping", default="generated",
                    help="mapping YAML, or a built-in name: sparkov, generated (default), canonical")
    bf.add_argument("--start", type=_date, help="first event date, UTC, inclusive (required without --catch-up)")
    bf.add_argument("--end", type=_date, help="last event date, UTC, inclusive (required without --catch-up)")
    bf.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    bf.add_argument("--feature-spec", help="feature spec YAML (default: the built-in v1 set)")
    bf.add_argument("--buckets", type=_positive, default=8, help="key partitions per entity (default 8)")
    bf.add_argument("--max-events-per-slice", type=_positive, default=DEFAULT_MAX_EVENTS_PER_SLICE,
                    help="cut an input of more events into event-time slices of at most about this many events, "
                         "history included, computed one after the other and committed once; peak memory follows "
                         f"it (default {DEFAULT_MAX_EVENTS_PER_SLICE:,})")
    bf.add_argument("--slice-days", type=_positive,
                    help="slices of this many days of the range instead of --max-events-per-slice")
    bf.add_argument("--feature-suite", default="features",
                    help="expectation suite for feature rows: built-in name or YAML (default features)")
    bf.add_argument("--no-validate", action="store_true", help="land feature rows without running the suite")
    bf.add_argument("--max-quarantine-fraction", type=float, default=0.01,
                    help="fail the run when more than this share of rows is quarantined (default 0.01)")
    bf.add_argument("--max-dead-letter-fraction", type=_fraction, default=0.1,
                    help="fail the run, before any commit, when more than this share of the rows read are dead "
                         "letters (default 0.1)")
    bf.add_argument("--allow-shrink", action="store_true",
                    help="allow replacing feature partitions that hold rows with empty ones or with fewer than "
                         "half as many rows (refused by default)")
    bf.add_argument("--online-store", help="also materialize card and merchant state into sqlite:PATH or "
                                           "redis://HOST:PORT/DB")
    bf.add_argument("--labels", action="append", default=[],
                    help="a labels feed (txn_id, is_fraud, label_time) as CSV, JSON Lines or Parquet; repeatable")
    bf.add_argument("--demo-key", action="store_true", help=f"tokenize with the public demo key if "
                                                            f"{TOKEN_KEY_ENV} is unset (test data only)")
    from finfeat.jobs import catchup as catchup_cmd
    from finfeat.jobs import progress as progress_mod
    from finfeat.jobs import runs as runs_cmd

    bf.add_argument("--log-format", choices=progress_mod.LOG_FORMATS, default="text",
                    help="text (default: a progress bar on a terminal, plain lines otherwise) or json "
                         "(one JSON object per line with the run id, for log shippers)")
    catchup_cmd.add_arguments(bf)
    runs_cmd.add_parser(sub)

    for name, module in _LATE_COMMANDS.items():
        if name == command:  # only the command being run imports its module (and what that needs)
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        else:
            sub.add_parser(name, help=LATE_COMMAND_HELP[name], add_help=False)

    demo = sub.add_parser("demo", help="run the main job end to end on the bundled public data",
                          allow_abbrev=False)
    demo.add_argument("--warehouse", default="warehouse")
    demo.add_argument("--input", action="append", help="default: the bundled Sparkov files in data/sparkov")
    demo.add_argument("--no-stream", action="store_true", help="skip the streaming replay")
    from finfeat.jobs.helptext import polish

    polish(parser)
    return parser


def _range_counts(report: dict[str, object]) -> tuple[int, int, int]:
    """Accepted events split into (in the range, history before it, ignored): the run counts
    the ignored ones; the range's events are the feature rows written or quarantined."""
    validation = report.get("validation") or {}
    in_range = int(report["features_written"]) + int(validation.get("quarantined", 0) or 0)
    ignored = int(report["events_outside_range"])
    return in_range, int(report["events_accepted"]) - in_range - ignored, ignored


def _commands() -> tuple[str, str]:
    """How to call finfeat and its Python from this shell: the bare names when the virtualenv's
    are first on the PATH, else their paths (a plain shell has not activated the virtualenv)."""
    import shutil

    bindir = Path(sys.executable).parent
    ours = shutil.which("finfeat") == str(bindir / "finfeat")
    rel = os.path.relpath(bindir) if not os.path.relpath(bindir).startswith("..") else str(bindir)
    return ("finfeat", "python") if ours else (f"{rel}/finfeat", f"{rel}/python")


def _print_report(report: dict[str, object], skipped: list[str] = ()) -> None:
    in_range, history, ignored = _range_counts(report)
    ff, py = _commands()
    lines = [
        "",
        f"finfeat backfill {report['run_id']}  ({report['range']}, spec {report['spec_hash']}, "
        f"{report.get('seconds', '?')} s)",
        f"  rows read          {report['rows_read']:>10,}",
        f"  events accepted    {report['events_accepted']:>10,}",
        f"    in the range     {in_range:>10,}",
        f"    history          {history:>10,}   (before the range, within the windows' reach: read, not written)",
        f"    ignored          {ignored:>10,}   (outside the range and its history)",
        f"  dead letters       {report['dead_letters']:>10,}",
    ]
    for reason, n in report["dead_letters_by_reason"].items():
        lines.append(f"    {reason:<22}{n:>8,}")
    if report["dead_letters_by_reason"].get("unreadable_file"):
        lines.append("    (unreadable_file: a whole file, or its rest, could not be read; each dead letter's detail "
                     "names the file and what to do)")
    for note in skipped:
        lines.append(f"  input skipped      {note}")
    if report.get("label_rows_read"):
        lines.append(f"  labels feed        {report['label_rows_read']:>10,} read, {report['labels_accepted']:,} accepted, "
                     f"{report['label_dead_letters']:,} dead letters")
    lines.append(f"  labels written     {report.get('labels_written', 0):>10,}")
    quarantined = report.get("events_quarantined", 0)
    ok = report["rows_read"] == report["events_accepted"] + report["dead_letters"] + quarantined
    lines.append(f"  reconciled         {'yes' if ok else 'NO'}: {report['rows_read']:,} = "
                 f"{report['events_accepted']:,} accepted + {report['dead_letters']:,} dead letters"
                 + (f" + {quarantined:,} quarantined" if quarantined else ""))
    lines.append(f"  features written   {report['features_written']:>10,}")
    if report.get("online_store"):
        lines.append(f"  online store       {report['online_store']['store']}  (state materialized)")
    validation = report.get("validation")
    if validation:
        lines.append(f"  validated          suite {validation['suite']}: {validation['quarantined']:,} quarantined, "
                     f"{sum(validation['warnings'].values()):,} warnings "
                     + (f"({', '.join(f'{k} {v}' for k, v in validation['warnings'].items())})"
                        if validation['warnings'] else ""))
    for name, info in report["tables"].items():
        lines.append(f"  delta {name:<13}{info['path']}  (version {info['version']})")
    lines += [
        f"  run report         {report['report_path']}",
        "next: look at the rows, check them, serve them" + ("" if ff == "finfeat" else
                                                            "   (or `. .venv/bin/activate` first)"),
        f"  {py} -c \"import deltalake; print(deltalake.DeltaTable('{report['tables']['features']['path']}')"
        ".to_pandas().head())\"",
        f"  {ff} validate --table {report['tables']['features']['path']} --suite features --docs out/dq",
        f"  {ff} backfill ... --online-store sqlite:online.db   then   {ff} serve-lookup --store sqlite:online.db ...",
        "",
    ]
    print("\n".join(lines))


def _cmd_generate(args: argparse.Namespace) -> int:
    from finfeat.jobs.generate import generate

    summary = generate(out=args.out, events=args.events, seed=args.seed, start=args.start.isoformat(),
                       days=args.days, cards=args.cards, merchants=args.merchants, fraud_rate=args.fraud_rate,
                       time_resolution=args.time_resolution, progress=sys.stderr.isatty() or True)
    print(f"wrote {summary.events:,} events ({summary.frauds:,} fraudulent: "
          + ", ".join(f"{k} {v:,}" for k, v in sorted(summary.by_pattern.items()))
          + f") from {summary.start} to {summary.end} to {summary.path}")
    return 0


def _cmd_backfill(args: argparse.Namespace, rest: list[str], *, demo: bool = False) -> int:
    from finfeat.jobs.backfill import BackfillConfig, run_backfill
    from finfeat.jobs.sources import list_inputs
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.spec import FeatureSpec

    from finfeat.jobs.delta import check_warehouse

    beam_args = _beam_args(rest)
    check_warehouse(args.warehouse)  # outputs first, before any input is read
    from finfeat.jobs import progress

    log_format = getattr(args, "log_format", "text")
    progress.configure_logging(log_format)
    if getattr(args, "catch_up", False):
        from finfeat.jobs import catchup

        return catchup.run(args, beam_args=beam_args, token_key=_token_key(args, demo=demo),
                           print_report=(lambda r: progress.emit_json("report", sys.stdout, run_id=r["run_id"],
                                                                      report=r))
                           if log_format == "json" else _print_report)
    if args.start is None or args.end is None:
        raise UsageError("--start and --end are required (or pass --catch-up to work out the days from the "
                         "run history)")
    if getattr(args, "dry_run", False) or getattr(args, "plan_json", None):
        raise UsageError("--dry-run and --plan-json go with --catch-up")
    inputs, skipped = list_inputs(args.input)
    spec = FeatureSpec.from_yaml(args.feature_spec) if getattr(args, "feature_spec", None) else FeatureSpec.default()
    cfg = BackfillConfig(inputs=inputs, mapping=Mapping.load(args.mapping),
                         warehouse=Path(args.warehouse), start=args.start, end=args.end,
                         token_key=_token_key(args, demo=demo), spec=spec, buckets=args.buckets,
                         labels=[Path(p) for p in getattr(args, "labels", [])],
                         feature_suite=None if getattr(args, "no_validate", False) else getattr(
                             args, "feature_suite", "features"),
                         event_suite=None if getattr(args, "no_validate", False) else "events",
                         max_quarantine_fraction=getattr(args, "max_quarantine_fraction", 0.01),
                         max_dead_letter_fraction=getattr(args, "max_dead_letter_fraction", 0.1),
                         allow_shrink=getattr(args, "allow_shrink", False),
                         online_store=getattr(args, "online_store", None),
                         max_events_per_slice=getattr(args, "max_events_per_slice", DEFAULT_MAX_EVENTS_PER_SLICE),
                         slice_days=getattr(args, "slice_days", None),
                         beam_args=beam_args)
    runner = next(a.split('=', 1)[1] for a in beam_args if a.startswith('--runner='))
    progress.set_run_id(cfg.run_id)
    if log_format == "json":
        progress.emit_json("backfill_start", range=f"{cfg.start}..{cfg.end}", inputs=len(cfg.inputs), runner=runner,
                           warehouse=str(cfg.warehouse))
    else:
        print(f"backfill {cfg.start}..{cfg.end}: {len(cfg.inputs)} input file(s), runner {runner}, "
              f"warehouse {cfg.warehouse}", file=sys.stderr)
    with progress.Progress(run_id=cfg.run_id, total_files=len(cfg.inputs), log_format=log_format):
        report = run_backfill(cfg)
    if log_format == "json":
        progress.emit_json("report", sys.stdout, run_id=report["run_id"], report=report)
    else:
        _print_report(report, skipped)
    # an empty range is an error, unless the user allowed replacing the range with less (--allow-shrink):
    # then an empty result (every row a dead letter, say) is what they asked for
    if _range_counts(report)[0] == 0 and not getattr(args, "allow_shrink", False):
        print(f"finfeat backfill: error: no event of the input falls in {cfg.start}..{cfg.end}, so no feature row was "
              "written; check --start and --end against the dates of your data", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    inputs = args.input or [str(root / "data" / "sparkov")]
    ns = argparse.Namespace(input=inputs, mapping="sparkov", start=date(2019, 1, 1), end=date(2020, 12, 31),
                            warehouse=args.warehouse, feature_spec=None, buckets=8, demo_key=True)
    print("demo: the public Sparkov card transactions (data/sparkov), Beam's local runner, Delta tables in "
          f"{args.warehouse}/", file=sys.stderr)
    code = _cmd_backfill(ns, rest, demo=True)
    if code == 0 and not args.no_stream:
        code = _demo_stream(Path(args.warehouse), inputs)
    return code


def _demo_stream(warehouse: Path, inputs: list[str]) -> int:
    """The streaming path on the same data: a replay through the unbounded pipeline, checked
    against what the backfill wrote."""
    import pyarrow.compute as pc

    from finfeat.jobs.delta import read_table
    from finfeat.jobs.replay import replay_features
    from finfeat.jobs.sources import expand_inputs, parse_files
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer
    from finfeat.transforms.spec import FeatureSpec

    path = max(expand_inputs(inputs), key=lambda p: p.stat().st_size)  # the larger file
    events, _ = parse_files([path], Mapping.load("sparkov"), CardTokenizer(DEMO_TOKEN_KEY.encode()), run_id="demo")
    events = events.sort_by("event_time").slice(0, 600)
    spec = FeatureSpec.default()
    print(f"\nstreaming replay: {events.num_rows} events of {path.name} through the unbounded pipeline "
          "(per-card state, event-time timers, shuffled within a 10-minute bound) ...", file=sys.stderr)
    streamed = replay_features(events, spec, bound_s=600, disorder_s=600)
    batch = read_table(warehouse / "features", columns=["txn_id", *spec.names],
                       filters=pc.field("txn_id").isin(events.column("txn_id")))
    joined = streamed.select(["txn_id", *spec.names]).sort_by("txn_id")
    same = joined.equals(batch.sort_by("txn_id").cast(joined.schema))
    print(f"streaming replay: {joined.num_rows} feature rows, "
          f"{'identical to' if same else 'DIFFERENT FROM'} the backfill's rows for those transactions")
    return 0 if same else 1


def _version() -> str:
    from finfeat import __version__

    return __version__


def _verbosity(argv: list[str]) -> int:
    """-v / --verbose / -vv before the sub-command."""
    n = 0
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif a == "--verbose":
            n += 1
        elif a.startswith("-v") and set(a[1:]) == {"v"}:
            n += len(a) - 1
        elif not a.startswith("-"):
            break
    return n


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbosity = _verbosity(argv)
    verbose = verbosity > 0
    # -v: finfeat's own loggers at INFO, libraries at WARNING; -vv: everything at INFO
    logging.basicConfig(level=logging.INFO if verbosity > 1 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("finfeat").setLevel(logging.INFO)
    # Beam warns at import that optional Google Cloud clients are absent; they are not used here.
    # GX sets its own loggers to INFO when imported; its chatter is for -vv only.
    quiet_gx = verbosity < 2
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
        # string keys are deterministic; Beam only cannot prove it without a type hint
        handler.addFilter(lambda record: verbosity > 1 or "Key coder FastPrimitivesCoder" not in record.getMessage())
        handler.addFilter(lambda record: not (quiet_gx and record.name.startswith("great_expectations")
                                              and record.levelno < logging.WARNING))
    from finfeat.jobs import project

    try:
        config, config_dir, argv = project.config_for(argv)
    except project.ConfigError as exc:
        print(f"finfeat: error: {exc}", file=sys.stderr)
        return 2
    parser = _parser(_command(argv))
    if config is not None:
        project.apply(parser, config, config_dir)
    args, rest = parser.parse_known_args(argv)
    if config is not None and args.command in {"backfill", "stream", "demo"}:
        rest = [*config.runner.flags, *rest]  # the command line's Beam flags come later and win
    restrict_umask()

    try:
        if args.command == "generate":
            if rest:
                raise UsageError(f"unknown flag(s) for generate: {' '.join(rest)}")
            return _cmd_generate(args)
        if args.command == "backfill":
            return _cmd_backfill(args, rest)
        if args.command == "runs":
            from finfeat.jobs import runs as runs_cmd

            if rest:
                raise UsageError(f"unknown flag(s) for runs: {' '.join(rest)}")
            return runs_cmd.run(args)
        if args.command == "stream":
            from finfeat.jobs import stream as stream_cmd

            return stream_cmd.run(args, rest)
        if args.command in _LATE_COMMANDS:
            if rest:
                raise UsageError(f"unknown flag(s) for {args.command}: {' '.join(rest)}")
            return __import__(_LATE_COMMANDS[args.command], fromlist=["run"]).run(args)
        return _cmd_demo(args, rest)
    except ModuleNotFoundError as exc:
        from finfeat.jobs.hints import install_hint

        hint = install_hint(exc.name)
        if hint is None:
            raise
        print(f"finfeat {args.command}: error: no module named {exc.name!r}: {hint}", file=sys.stderr)
        return 2
    except (UsageError, ValueError) as exc:  # MappingError, SpecError, SuiteError are ValueErrors
        hint = ""
        if "does not have; its columns are" in str(exc) and getattr(args, "input", None):
            from finfeat.jobs.hints import mapping_hint

            hint = mapping_hint(args.input, getattr(args, "mapping", None))
        print(f"finfeat {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from finfeat.validation.validate import ValidationFailed

        if isinstance(exc, ValidationFailed):
            print(f"finfeat {args.command}: data quality check failed, nothing was committed: {exc}", file=sys.stderr)
            return 1
        from finfeat.jobs.delta import CommitConflict, ShrinkRefused

        refused = (CommitConflict, ShrinkRefused)
        if args.command in {"backfill", "demo"}:
            from finfeat.jobs.backfill import ReconciliationError, TooManyDeadLetters

            refused += (ReconciliationError, TooManyDeadLetters)
        if isinstance(exc, refused):
            print(f"finfeat {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


#: Commands that run a streaming engine in this process: they end with ``os._exit`` (see :func:`entry`).
_EXIT_AT_ONCE = frozenset({"stream"})


def entry() -> None:
    """The ``finfeat`` executable: :func:`main`, then exit with its code.

    A streaming command leaves native threads behind (gRPC's of the Beam runner, librdkafka's),
    and the interpreter's shutdown could abort on them ("terminate called without an active
    exception", exit -6) after the job had committed everything and printed its summary. Such a
    command flushes its output and logs and ends with ``os._exit`` instead, skipping that
    shutdown; its exit code is the job's. Every other command exits normally."""
    argv = sys.argv[1:]
    code = main(argv)
    if _command(argv) in _EXIT_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
