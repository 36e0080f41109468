"""Backfill throughput: finfeat on Beam's local runner vs DuckDB, same input, same features.

    python benchmarks/bench_backfill.py --events 1000000 [--sparkov-rows 431773] [--repeat 3]

1. Generates N events with the seeded generator (cached under out/bench/) and turns them into
   one canonical-events Parquet file (card numbers tokenized), untimed. With ``--sparkov-rows``,
   also the first that many of them as a CSV in the Sparkov layout (the public card-fraud
   data's 23 columns, the personal ones filled with placeholders), untimed.
2. Times, each in a fresh subprocess so peak memory is its own, engines interleaved and each
   ``--repeat`` times (the median is reported: the machine is shared and noisy):
   - finfeat: `finfeat backfill` over that file into a new Delta table (mapping canonical for
     the Parquet file, sparkov for the CSV: parse, HMAC tokenization, dead letters, Delta);
     once without and once with the expectation suites;
   - DuckDB: the fastest SQL we could write (benchmarks/duckdb_features.sql: RANGE windows,
     no self-joins) over the same file into Parquet (for the CSV, DuckDB's reader and a
     projection onto the canonical columns; card numbers are used as they are, not tokenized).
3. Prints events/s for each, the ratio to DuckDB's rate, CPU seconds (user + system, all
   threads and child processes: steadier than wall time on a busy machine) and their ratio
   to DuckDB's, and peak RSS. Library imports are not timed for any engine (DuckDB's and
   finfeat's modules, and GX's for the validated run: its import is printed apart).
   Targets: finfeat >= 1.0 x DuckDB without validation, >= 0.8 x with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_FINFEAT = """
import sys, time, json
from datetime import date
from pathlib import Path
from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.schemas.mapping import Mapping
src, wh, start, end, validate, mapping, runner_args = (sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4],
                                                      sys.argv[5] == "1", sys.argv[6], sys.argv[7:])
import resource
def _cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
if validate:
    from finfeat.validation import _gx
    _gx.gx()  # the GX import (seconds), like DuckDB's, before the clock starts; reported apart
c = _cpu()
t = time.perf_counter()
report = run_backfill(BackfillConfig(inputs=[Path(src)], mapping=Mapping.load(mapping), warehouse=Path(wh),
    start=date.fromisoformat(start), end=date.fromisoformat(end), token_key=b"bench-key-0123456789",
    beam_args=runner_args, feature_suite="features" if validate else None, event_suite="events" if validate else None))
seconds, cpu = time.perf_counter() - t, _cpu() - c
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
gx_import = _gx.import_seconds() if validate else None
print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": report["features_written"], "peak_kib": peak,
                  "gx_import": gx_import}))
"""

_DUCKDB = """
import sys, time, json
sys.path.insert(0, sys.argv[3])
from benchmarks.duckdb_features import duckdb_features_to_parquet
import resource
def _cpu():
    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime
c = _cpu()
t = time.perf_counter()
rows = duckdb_features_to_parquet(sys.argv[1], sys.argv[2], sparkov_csv=sys.argv[1].endswith(".csv"))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": _cpu() - c, "rows": rows,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _run(code: str, *args: str) -> tuple[dict, float]:
    """Run one engine in a fresh interpreter; its own peak RSS (including its child processes).

    The code runs from a file, not ``python -c``: with pyspark installed, GX's import of
    pyspark.sql.connect exits a ``-c`` interpreter with status 0, as if it were a doctest run.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    try:
        out = subprocess.run([sys.executable, fh.name, *args], check=True, capture_output=True, text=True)
    finally:
        Path(fh.name).unlink()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result, result["peak_kib"] / 1024


def _canonical(events: int, folder: Path) -> tuple[Path, str, str]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from finfeat.jobs.generate import generate
    from finfeat.jobs.sources import read_file
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer, parse_batch

    raw = folder / f"generated_{events}.parquet"
    canonical = folder / f"canonical_{events}.parquet"
    if not raw.exists():
        print(f"generating {events:,} events -> {raw}", file=sys.stderr)
        generate(out=raw, events=events, seed=7, progress=False)
    if not canonical.exists():
        mapping, tok = Mapping.load("generated"), CardTokenizer(b"bench-key-0123456789")
        parts = []
        for batch, _ in read_file(raw, mapping, tok, run_id="bench", recorded_at_us=0):
            ev, _dead = parse_batch(batch, mapping=mapping, tokenizer=tok, source=raw.name, run_id="bench",
                                    recorded_at_us=0)
            parts.append(ev.drop_columns(["_source", "_source_row"]))
        pq.write_table(pa.concat_tables(parts), canonical)
    t = pq.read_table(canonical, columns=["event_time"]).column("event_time")
    lo, hi = pc.min(t).as_py().date(), pc.max(t).as_py().date()
    return canonical, lo.isoformat(), hi.isoformat()


_SPARKOV_HEADER = ["", "trans_date_trans_time", "cc_num", "merchant", "category", "amt", "first", "last",
                   "gender", "street", "city", "state", "zip", "lat", "long", "city_pop", "job", "dob",
                   "trans_num", "unix_time", "merch_lat", "merch_long", "is_fraud"]


def _sparkov_csv(events: int, rows: int, folder: Path) -> tuple[Path, str, str]:
    """The first ``rows`` generated events as a Sparkov-layout CSV (placeholders for personal data)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = folder / f"sparkov_{rows}.csv"
    raw = pq.read_table(folder / f"generated_{events}.parquet").slice(0, rows)
    t = raw.column("event_time")
    if not out.exists():
        n = raw.num_rows
        const = lambda v, typ=pa.string(): pa.array([v] * n, typ)  # noqa: E731
        amount = raw.column("amount_minor").to_numpy()
        cols = {
            "": pa.array(range(n), pa.int64()),
            "trans_date_trans_time": pc.strftime(t.cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%d %H:%M:%S"),
            "cc_num": raw.column("card_number"),
            "merchant": pc.binary_join_element_wise("fraud_", raw.column("merchant_id"), ""),
            "category": raw.column("merchant_category"),
            "amt": pa.array([f"{a // 100}.{a % 100:02d}" for a in amount.tolist()]),
            "first": const("Jane"), "last": const("Doe"), "gender": const("F"),
            "street": const("1 Main St"), "city": const("Springfield"), "state": const("IL"),
            "zip": const("62701"), "lat": raw.column("card_lat"), "long": raw.column("card_lon"),
            "city_pop": const(100000, pa.int64()), "job": const("Engineer"), "dob": const("1980-01-01"),
            "trans_num": raw.column("txn_id"),
            "unix_time": pc.divide(t.cast(pa.int64()), 1_000_000),
            "merch_lat": raw.column("merchant_lat"), "merch_long": raw.column("merchant_lon"),
            "is_fraud": raw.column("is_fraud").cast(pa.int8()),
        }
        pacsv.write_csv(pa.table(cols), out, pacsv.WriteOptions(quoting_style="needed"))
    lo, hi = pc.min(t).as_py().date(), pc.max(t).as_py().date()
    return out, lo.isoformat(), hi.isoformat()


def _compare(label: str, src: Path, start: str, end: str, folder: Path, runner: list[str], repeat: int) -> None:
    import statistics

    wh, out_pq = folder / "warehouse", folder / "duckdb_features.parquet"
    mapping = "sparkov" if src.suffix == ".csv" else "canonical"
    engines = [("finfeat backfill -> Delta", _FINFEAT, "0"), ("finfeat + GX validation", _FINFEAT, "1"),
               ("DuckDB SQL -> Parquet", _DUCKDB, None)]
    runs: dict[str, list[tuple[dict, float]]] = {name: [] for name, _, _ in engines}
    for _ in range(repeat):
        for name, code, validate in engines:
            shutil.rmtree(wh, ignore_errors=True)
            if code is _DUCKDB:
                runs[name].append(_run(code, str(src), str(out_pq), str(REPO)))
            else:
                runs[name].append(_run(code, str(src), str(wh), start, end, validate, mapping, *runner))
    med = {name: (statistics.median(r["seconds"] for r, _ in rs), statistics.median(r["cpu"] for r, _ in rs),
                  rs[0][0]["rows"], max(m for _, m in rs)) for name, rs in runs.items()}
    duck_s, duck_cpu, duck_rows, _ = med["DuckDB SQL -> Parquet"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{label}, {start}..{end}, {src.name} ({src.stat().st_size / 1e6:.1f} MB); "
          f"median of {repeat} run(s), engines interleaved; load average now {load} on {os.cpu_count()} cpus")
    print(f"{'engine':<28}{'rows':>11}{'wall s':>8}{'events/s':>10}{'vs DuckDB':>10}{'cpu s':>8}"
          f"{'cpu vs DuckDB':>14}{'peak MiB':>10}  all runs (wall s)")
    for name, (sec, cpu, rows, mem) in med.items():
        every = ", ".join(f"{r['seconds']:.1f}" for r, _ in runs[name])
        gx = [r.get("gx_import") for r, _ in runs[name] if r.get("gx_import")]
        extra = f"; GX import {statistics.median(gx):.1f} s, not timed" if gx else ""
        print(f"{name:<28}{rows:>11,}{sec:>8.2f}{rows / sec:>10,.0f}{(rows / sec) / (duck_rows / duck_s):>10.2f}"
              f"{cpu:>8.2f}{duck_cpu / cpu * rows / duck_rows:>14.2f}{mem:>10,.0f}  {every}{extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--folder", default=str(REPO / "out" / "bench"))
    ap.add_argument("--runner-arg", action="append", default=[],
                    help="extra Beam flag for finfeat, e.g. --runner-arg=--direct_num_workers=2")
    ap.add_argument("--sparkov-rows", type=int, default=0,
                    help="also a Sparkov-layout CSV of the first N generated events (the issue's file: 431773)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine; the median is reported")
    ap.add_argument("--skip-parquet", action="store_true", help="only the CSV case")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    src, start, end = _canonical(args.events, folder)
    runner = ["--runner=FnApiRunner", *args.runner_arg]
    print(f"finfeat runner flags: {' '.join(runner)}")
    if not args.skip_parquet:
        _compare(f"{args.events:,} generated events, canonical Parquet", src, start, end, folder, runner, args.repeat)
    if args.sparkov_rows:
        csv, lo, hi = _sparkov_csv(args.events, args.sparkov_rows, folder)
        _compare(f"{args.sparkov_rows:,} generated events, Sparkov-layout CSV", csv, lo, hi, folder, runner,
                 args.repeat)
    print("targets: finfeat >= 1.0 x DuckDB without validation, >= 0.8 x with the expectation suites")
    return 0


if __name__ == "__main__":
    sys.exit(main())
