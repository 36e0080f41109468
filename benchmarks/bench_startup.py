"""Start-up time of the CLI: ``finfeat --help`` and a failing flag, each in a fresh process.

    python benchmarks/bench_startup.py [--runs 10]

Prints the median and p90 wall time of each command over ``--runs`` runs (after one untimed
warm-up run that fills the OS file cache), the heavy libraries each one imported, and the
interpreter's own start-up as the floor. Target: under 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("apache_beam", "great_expectations", "deltalake", "pyarrow", "pandas", "numpy", "pydantic", "yaml")

_PROBE = """
import sys
from finfeat.jobs.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""

COMMANDS = {
    "finfeat --help": ["--help"],
    "finfeat backfill --start nope": ["backfill", "--input", "x", "--start", "nope", "--end", "2020-01-01"],
    "finfeat validate --version -1": ["validate", "--table", "x", "--version", "-1"],
}


def _finfeat() -> list[str]:
    exe = Path(sys.executable).with_name("finfeat")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "finfeat.jobs.cli"]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    print(f"{'command':<34}{'median s':>10}{'p90 s':>8}  heavy imports")
    times = []
    for _ in range(args.runs):  # the floor: the interpreter alone, on this machine, now
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], capture_output=True)
        times.append(time.perf_counter() - t)
    print(f"{'python -c pass (the floor)':<34}{statistics.median(times):>10.3f}{_quantile(times, 0.9):>8.3f}")
    for label, argv in COMMANDS.items():
        times = []
        for i in range(args.runs + 1):
            t = time.perf_counter()
            subprocess.run([*_finfeat(), *argv], capture_output=True, text=True)
            if i:
                times.append(time.perf_counter() - t)
        probe = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv],
                               capture_output=True, text=True)
        heavy = next((line[6:] for line in probe.stderr.splitlines() if line.startswith("HEAVY=")), "?")
        print(f"{label:<34}{statistics.median(times):>10.3f}{_quantile(times, 0.9):>8.3f}  {heavy or 'none'}")
    print(f"target: under 0.5 s each (load average now {', '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} cpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
