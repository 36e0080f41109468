"""Backfill throughput: finfeat on Beam's local runner vs DuckDB, same input, same features.

    python benchmarks/bench_backfill.py --events 1000000

1. Generates N events with the seeded generator (cached under out/bench/) and turns them into
   one canonical-events Parquet file (card numbers tokenized), untimed.
2. Times, each in a fresh subprocess so peak memory is its own:
   - finfeat: `finfeat backfill --mapping canonical` over that file into a new Delta table;
   - DuckDB: the fastest SQL we could write (benchmarks/duckdb_features.sql: RANGE windows,
     no self-joins) over the same file into Parquet.
3. Prints events/s for both, their ratio and peak RSS. Target: finfeat >= 0.5 x DuckDB.
"""
from __future__ import annotations

import argparse
import json
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
src, wh, start, end, validate, runner_args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6:]
t = time.perf_counter()
report = run_backfill(BackfillConfig(inputs=[Path(src)], mapping=Mapping.load("canonical"), warehouse=Path(wh),
    start=date.fromisoformat(start), end=date.fromisoformat(end), token_key=b"bench-key-0123456789",
    beam_args=runner_args, feature_suite="features" if validate else None, event_suite="events" if validate else None))
import resource
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": time.perf_counter() - t, "rows": report["features_written"], "peak_kib": peak}))
"""

_DUCKDB = """
import sys, time, json
sys.path.insert(0, sys.argv[3])
from benchmarks.duckdb_features import duckdb_features_to_parquet
t = time.perf_counter()
rows = duckdb_features_to_parquet(sys.argv[1], sys.argv[2])
import resource
print(json.dumps({"seconds": time.perf_counter() - t, "rows": rows,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--folder", default=str(REPO / "out" / "bench"))
    ap.add_argument("--runner-arg", action="append", default=[],
                    help="extra Beam flag for finfeat, e.g. --runner-arg=--direct_num_workers=2")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    src, start, end = _canonical(args.events, folder)
    wh, out_pq = folder / "warehouse", folder / "duckdb_features.parquet"
    shutil.rmtree(wh, ignore_errors=True)
    runner = ["--runner=FnApiRunner", *args.runner_arg]
    rows = []
    for label, validate in (("finfeat backfill -> Delta", "0"), ("finfeat + GX validation", "1")):
        shutil.rmtree(wh, ignore_errors=True)
        result, mem = _run(_FINFEAT, str(src), str(wh), start, end, validate, *runner)
        rows.append((label, result, mem))
    duck, duck_mem = _run(_DUCKDB, str(src), str(out_pq), str(REPO))
    rows.append(("DuckDB SQL -> Parquet", duck, duck_mem))
    duck_rate = duck["rows"] / duck["seconds"]
    print(f"input: {args.events:,} generated events, {start}..{end}, {src.stat().st_size / 1e6:.1f} MB Parquet")
    print(f"{'engine':<32}{'rows':>12}{'seconds':>10}{'events/s':>12}{'peak MiB':>10}{'vs DuckDB':>11}")
    for label, result, mem in rows:
        rate = result["rows"] / result["seconds"]
        print(f"{label:<32}{result['rows']:>12,}{result['seconds']:>10.2f}{rate:>12,.0f}{mem:>10,.0f}"
              f"{rate / duck_rate:>11.2f}")
    print("target: finfeat >= 0.50 x DuckDB (the first row: the same work as the SQL; the second adds the "
          "expectation suites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
