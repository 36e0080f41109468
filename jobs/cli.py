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

from finfeat.jobs.argtypes import iso_date as _date, positive_int as _positive

_LOG = logging.getLogger(__name__)

DEMO_TOKEN_KEY = "finfeat-demo-key--not-a-secret"
TOKEN_KEY_ENV = "FINFEAT_TOKEN_KEY"
DEFAULT_RUNNER = "FnApiRunner"
#: sub-commands whose module holds both the parser and the command, in help order, with the
#: one-line help their ``add_parser`` gives (so ``finfeat --help`` lists them without importing
#: them: some import Beam, Kafka or xgboost; a test keeps the two texts equal).
_LATE_COMMANDS = {
    "training-set": "finfeat.jobs.training", "maintain": "finfeat.jobs.maintain",
    "train": "finfeat.jobs.train", "score": "finfeat.jobs.score",
    "produce": "finfeat.jobs.produce", "stream": "finfeat.jobs.stream",
    "serve-lookup": "finfeat.jobs.serve_lookup", "validate": "finfeat.jobs.validate",
}
LATE_COMMAND_HELP = {
    "training-set": "features joined with the labels known at a cut-off, pinned to Delta versions",
    "maintain": "compact small files and vacuum old ones (Delta tables)",
    "train": "train an xgboost fraud model on time windows, with a baseline",
    "score": "score transactions with a trained model (batch or one JSON)",
    "produce": "publish transactions (a file) to a Kafka topic as JSON",
    "stream": "Kafka -> features -> Delta (and the online store), exactly once",
    "serve-lookup": "look a candidate transaction up in the online store (prints JSON)",
    "validate": "data-quality checks of a Delta table: expectation suite and drift (for CI)",
}


class UsageError(Exception):
    """A bad flag, file or config; the message says how to fix it."""


def _beam_args(rest: list[str]) -> list[str]:
    """Check that Beam knows every left-over flag; default the runner to the local one."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    seen: set[type] = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # an option declared by two classes
    _, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UsageError(f"unknown flag(s) {' '.join(unknown)}: not a finfeat flag (see `finfeat <command> --help`) "
                         "and not a Beam pipeline option")
    if not any(a == "--runner" or a.startswith("--runner=") for a in rest):
        rest = [f"--runner={DEFAULT_RUNNER}", *rest]
    return rest


def _token_key(args: argparse.Namespace, *, demo: bool) -> bytes:
    key = os.environ.get(TOKEN_KEY_ENV)
    if key:
        return key.encode()
    if demo or getattr(args, "demo_key", False):
        print(f"note: card numbers are tokenized with the visible DEMO key {DEMO_TOKEN_KEY!r}; "
              f"set {TOKEN_KEY_ENV} to a secret of at least 16 bytes for real data", file=sys.stderr)
        return DEMO_TOKEN_KEY.encode()
    raise UsageError(f"no tokenization key: set {TOKEN_KEY_ENV} to a secret of at least 16 bytes "
                     "(or pass --demo-key to use the public demo key on test data)")


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not a flag), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; of the late commands only ``command``'s is complete (the others list
    their help line), so that ``finfeat --help`` or a bad flag imports none of them."""
    parser = argparse.ArgumentParser(prog="finfeat", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO")
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
    bf.add_argument("--start", type=_date, required=True, help="first event date, UTC, inclusive")
    bf.add_argument("--end", type=_date, required=True, help="last event date, UTC, inclusive")
    bf.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    bf.add_argument("--feature-spec", help="feature spec YAML (default: the built-in v1 set)")
    bf.add_argument("--buckets", type=_positive, default=8, help="key partitions per entity (default 8)")
    bf.add_argument("--feature-suite", default="features",
                    help="expectation suite for feature rows: built-in name or YAML (default features)")
    bf.add_argument("--no-validate", action="store_true", help="land feature rows without running the suite")
    bf.add_argument("--max-quarantine-fraction", type=float, default=0.01,
                    help="fail the run when more than this share of rows is quarantined (default 0.01)")
    bf.add_argument("--online-store", help="also materialize card and merchant state into sqlite:PATH or "
                                           "redis://HOST:PORT/DB")
    bf.add_argument("--labels", action="append", default=[],
                    help="a labels feed (txn_id, is_fraud, label_time) as CSV, JSON Lines or Parquet; repeatable")
    bf.add_argument("--demo-key", action="store_true", help=f"tokenize with the public demo key if "
                                                            f"{TOKEN_KEY_ENV} is unset (test data only)")

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
    return parser


def _print_report(report: dict[str, object]) -> None:
    lines = [
        "",
        f"finfeat backfill {report['run_id']}  ({report['range']}, spec {report['spec_hash']}, "
        f"{report.get('seconds', '?')} s)",
        f"  rows read          {report['rows_read']:>10,}",
        f"  events accepted    {report['events_accepted']:>10,}"
        f"   (of which {report['events_outside_range']:,} outside the range, used as history or ignored)",
        f"  dead letters       {report['dead_letters']:>10,}",
    ]
    for reason, n in report["dead_letters_by_reason"].items():
        lines.append(f"    {reason:<22}{n:>8,}")
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
        "next: look at the rows, check them, serve them",
        f"  python -c \"import deltalake; print(deltalake.DeltaTable('{report['tables']['features']['path']}')"
        ".to_pandas().head())\"",
        f"  finfeat validate --table {report['tables']['features']['path']} --suite features --docs out/dq",
        f"  finfeat backfill ... --online-store sqlite:online.db   then   finfeat serve-lookup --store sqlite:online.db ...",
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
    from finfeat.jobs.sources import expand_inputs
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.spec import FeatureSpec

    beam_args = _beam_args(rest)
    spec = FeatureSpec.from_yaml(args.feature_spec) if getattr(args, "feature_spec", None) else FeatureSpec.default()
    cfg = BackfillConfig(inputs=expand_inputs(args.input), mapping=Mapping.load(args.mapping),
                         warehouse=Path(args.warehouse), start=args.start, end=args.end,
                         token_key=_token_key(args, demo=demo), spec=spec, buckets=args.buckets,
                         labels=[Path(p) for p in getattr(args, "labels", [])],
                         feature_suite=None if getattr(args, "no_validate", False) else getattr(
                             args, "feature_suite", "features"),
                         event_suite=None if getattr(args, "no_validate", False) else "events",
                         max_quarantine_fraction=getattr(args, "max_quarantine_fraction", 0.01),
                         online_store=getattr(args, "online_store", None),
                         beam_args=beam_args)
    print(f"backfill {cfg.start}..{cfg.end}: {len(cfg.inputs)} input file(s), runner "
          f"{next(a.split('=', 1)[1] for a in beam_args if a.startswith('--runner='))}, warehouse {cfg.warehouse}",
          file=sys.stderr)
    report = run_backfill(cfg)
    _print_report(report)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Beam warns at import that optional Google Cloud clients are absent; they are not used here.
    # GX sets its own loggers to INFO when imported; its chatter is for -v only.
    quiet_gx = not verbose
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
        # string keys are deterministic; Beam only cannot prove it without a type hint
        handler.addFilter(lambda record: verbose or "Key coder FastPrimitivesCoder" not in record.getMessage())
        handler.addFilter(lambda record: not (quiet_gx and record.name.startswith("great_expectations")
                                              and record.levelno < logging.WARNING))
    parser = _parser(_command(argv))
    args, rest = parser.parse_known_args(argv)

    try:
        if args.command == "generate":
            if rest:
                raise UsageError(f"unknown flag(s) for generate: {' '.join(rest)}")
            return _cmd_generate(args)
        if args.command == "backfill":
            return _cmd_backfill(args, rest)
        if args.command == "stream":
            from finfeat.jobs import stream as stream_cmd

            return stream_cmd.run(args, rest)
        if args.command in _LATE_COMMANDS:
            if rest:
                raise UsageError(f"unknown flag(s) for {args.command}: {' '.join(rest)}")
            return __import__(_LATE_COMMANDS[args.command], fromlist=["run"]).run(args)
        return _cmd_demo(args, rest)
    except (UsageError, ValueError) as exc:  # MappingError, SpecError, SuiteError are ValueErrors
        print(f"finfeat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from finfeat.validation.validate import ValidationFailed

        if isinstance(exc, ValidationFailed):
            print(f"finfeat {args.command}: data quality check failed, nothing was committed: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
