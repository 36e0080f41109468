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

    python benchmarks/bench_backfill.py --memory 1000000,2000000,4000000,10000000

measures peak memory instead: for each count, events generated at the same density (60 days per
million, ``--days-per-million``), backfilled without validation with the default slicing, as one
pipeline (skipped when the machine has not the memory free), and, for an input that fits one
slice, forced into slices of ``--forced-slice`` events; DuckDB on the same file for the ratio.
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
src, wh, start, end, validate, mapping, max_events, runner_args = (
    sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6], int(sys.argv[7]), sys.argv[8:])
slicing = {"max_events_per_slice": max_events} if max_events else {}
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
    beam_args=runner_args, feature_suite="features" if validate else None, event_suite="events" if validate else None,
    **slicing))
seconds, cpu = time.perf_counter() - t, _cpu() - c
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
gx_import = _gx.import_seconds() if validate else None
print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": report["features_written"], "peak_kib": peak,
                  "gx_import": gx_import, "slices": report.get("slices")}))
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


def _canonical(events: int, folder: Path, days: int | None = None) -> tuple[Path, str, str]:
    """The generated events (60 days, or ``days``) as one canonical-events Parquet file, cached."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from finfeat.jobs.generate import generate
    from finfeat.jobs.sources import read_file
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer, parse_batch

    tag = f"{events}" if days is None else f"{events}_{days}d"
    raw = folder / f"generated_{tag}.parquet"
    canonical = folder / f"canonical_{tag}.parquet"
    if not raw.exists():
        print(f"generating {events:,} events -> {raw}", file=sys.stderr)
        generate(out=raw, events=events, seed=7, progress=False, **({"days": days} if days else {}))
    if not canonical.exists():
        mapping, tok = Mapping.load("generated"), CardTokenizer(b"bench-key-0123456789")
        writer = None
        for batch, _ in read_file(raw, mapping, tok, run_id="bench", recorded_at_us=0):
            ev, _dead = parse_batch(batch, mapping=mapping, tokenizer=tok, source=raw.name, run_id="bench",
                                    recorded_at_us=0)
            ev = ev.drop_columns(["_source", "_source_row"])
            writer = writer or pq.ParquetWriter(canonical, ev.schema)
            writer.write_table(ev)
        writer.close()
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
                runs[name].append(_run(code, str(src), str(wh), start, end, validate, mapping, "0", *runner))
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


def _free_gib() -> float:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
    return info["MemAvailable"] / 1024 / 1024


def _memory(sizes: list[int], folder: Path, runner: list[str], days_per_million: int, forced_slice: int,
            one_pipeline: bool = True) -> None:
    """Peak RSS of the backfill (no validation) with the default slicing and as one pipeline, for
    inputs of the same density (``days_per_million`` days per million events): past the longest
    window, a slice's history holds the same number of events whatever the input's length.
    DuckDB on the same file gives the throughput ratio."""
    from finfeat.jobs.options import DEFAULT_MAX_EVENTS_PER_SLICE

    wh, out_pq = folder / "warehouse", folder / "duckdb_features.parquet"
    rows = []
    for n in sizes:
        days = max(1, round(n * days_per_million / 1_000_000))
        src, start, end = _canonical(n, folder, days)
        modes = [("sliced (default)", "0"), *([("one pipeline", str(10 ** 12))] if one_pipeline else [])]
        if forced_slice and n <= DEFAULT_MAX_EVENTS_PER_SLICE:
            modes.insert(1, (f"sliced, {forced_slice:,}/slice", str(forced_slice)))
        for name, max_events in modes:
            need = 0.3 + 1.3 * n / 1e6  # GiB, by the one pipeline's measured line, with a margin
            if max_events == str(10 ** 12) and n > DEFAULT_MAX_EVENTS_PER_SLICE and _free_gib() < need:
                print(f"{n:,} events, {name}: skipped, needs about {need:.0f} GiB, {_free_gib():.1f} GiB free")
                continue
            shutil.rmtree(wh, ignore_errors=True)
            r, mib = _run(_FINFEAT, str(src), str(wh), start, end, "0", "canonical", max_events, *runner)
            rows.append((n, days, name, r, mib))
            print(f"{n:,} events / {days} days, {name}: {r['seconds']:.1f} s wall, {r['cpu']:.1f} s CPU, "
                  f"{r['slices']} slice(s), peak {mib:,.0f} MiB", flush=True)
        r, mib = _run(_DUCKDB, str(src), str(out_pq), str(REPO))
        rows.append((n, days, "DuckDB SQL -> Parquet", r, mib))
        print(f"{n:,} events / {days} days, DuckDB: {r['seconds']:.1f} s wall, {r['cpu']:.1f} s CPU, "
              f"peak {mib:,.0f} MiB", flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\npeak memory, {days_per_million} days per million events, no validation; load average now {load} "
          f"on {os.cpu_count()} cpus")
    print(f"{'events':>11}{'days':>6}  {'engine':<26}{'slices':>7}{'wall s':>8}{'cpu s':>8}{'cpu vs DuckDB':>14}"
          f"{'peak MiB':>10}")
    duck = {n: r for n, _, name, r, _ in rows if name.startswith("DuckDB")}
    for n, days, name, r, mib in rows:
        ratio = duck[n]["cpu"] / r["cpu"] if n in duck else float("nan")
        print(f"{n:>11,}{days:>6}  {name:<26}{str(r.get('slices') or '-'):>7}{r['seconds']:>8.1f}{r['cpu']:>8.1f}"
              f"{ratio:>14.2f}{mib:>10,.0f}")


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
    ap.add_argument("--memory", help="instead: peak memory with and without slicing for these event counts, "
                                     "e.g. 1000000,2000000,4000000,10000000")
    ap.add_argument("--days-per-million", type=int, default=60,
                    help="with --memory: days of generated events per million (default 60, as make bench)")
    ap.add_argument("--forced-slice", type=int, default=500_000,
                    help="with --memory: also run inputs that fit one slice cut into slices of this many events")
    ap.add_argument("--skip-one-pipeline", action="store_true", help="with --memory: only the sliced runs")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.memory:
        runner = ["--runner=FnApiRunner", *args.runner_arg]
        _memory([int(x) for x in args.memory.split(",")], folder, runner, args.days_per_million, args.forced_slice,
                one_pipeline=not args.skip_one_pipeline)
        return 0
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
