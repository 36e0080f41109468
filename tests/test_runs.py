"""finfeat runs: the history of real runs, succeeded and failed; progress lines and JSON logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finfeat.jobs.generate import generate
from tests.catchup_fixtures import FIRST_DAY, TOKEN_KEY, day
from tests.conftest import RUNNER

IMPOSSIBLE_SUITE = """\
name: impossible
description: a suite no real data passes
expectations:
  - name: card_count_huge
    policy: fail
    type: expect_column_values_to_be_between
    kwargs: {column: card_count_1h, min_value: 1000000}
"""


def _finfeat(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY}
    return subprocess.run([sys.executable, "-m", "finfeat.jobs.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], str]:
    """A warehouse with one succeeded run (JSON logs) and one failed run (a failed suite)."""
    root = tmp_path_factory.mktemp("runs")
    events = root / "events.parquet"
    generate(out=events, events=500, seed=3, start=FIRST_DAY.isoformat(), days=3, cards=40, merchants=32)
    wh = root / "wh"
    base = ["backfill", "--input", str(events), "--mapping", "generated", "--warehouse", str(wh),
            "--start", day(1).isoformat(), f"--runner={RUNNER}"]
    ok = _finfeat(*base, "--end", day(2).isoformat(), "--log-format", "json")
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines() if line.startswith("{")]
    report = next(x for x in lines if x["event"] == "report")["report"]
    suite = root / "impossible.yaml"
    suite.write_text(IMPOSSIBLE_SUITE)
    bad = _finfeat(*base, "--end", day(3).isoformat(), "--feature-suite", str(suite))
    assert bad.returncode == 1, bad.stderr
    assert "data quality check failed" in bad.stderr
    assert "1/1 files, 500 rows parsed" in bad.stderr  # plain progress lines off a terminal
    return wh, {"report": report, "stdout": ok.stdout, "stderr": ok.stderr}, bad.stderr


def test_json_logs_carry_the_run_id_and_the_read_progress(history: tuple[Path, dict[str, object], str]) -> None:
    _, ok, _ = history
    report = ok["report"]
    progress = [json.loads(line) for line in str(ok["stderr"]).splitlines()
                if line.startswith("{") and json.loads(line).get("event") == "progress"]
    assert progress, ok["stderr"]
    assert {p["run_id"] for p in progress} == {report["run_id"]}
    # every line is one JSON object carrying the run id
    every = [json.loads(line) for line in str(ok["stderr"]).splitlines() if line.strip()]
    assert {x["run_id"] for x in every} == {report["run_id"]}
    assert every[0]["event"] == "backfill_start"
    final = progress[-1]
    assert final["final"] is True and final["files_done"] == final["files_total"] == 1
    assert final["rows_parsed"] == report["rows_read"] == 500


def test_runs_lists_succeeded_and_failed_runs(history: tuple[Path, dict[str, object], str]) -> None:
    wh, ok, _ = history
    listing = _finfeat("runs", "--warehouse", str(wh), "--json")
    assert listing.returncode == 0, listing.stderr
    runs = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [r["status"] for r in runs] == ["succeeded", "failed"]
    good, failed = runs
    assert good["run_id"] == ok["report"]["run_id"]
    assert good["range"] == f"{day(1)}..{day(2)}" and good["kind"] == "backfill"
    assert good["rows_read"] == 500 and good["events_accepted"] + good["dead_letters"] == 500
    assert good["features_written"] == ok["report"]["features_written"] > 0
    assert good["versions"]["features"] == 0 and good["commits"]["features"] == [0]
    assert good["spec_hash"] and good["code_version"]
    assert failed["commits"] == {}  # a failed suite commits nothing

    text = _finfeat("runs", "--warehouse", str(wh))
    assert text.returncode == 0
    assert "FAILED" in text.stdout and "2 run(s); 1 failed or interrupted" in text.stdout
    assert "ok" in text.stdout.splitlines()[1].split()

    last = _finfeat("runs", "--warehouse", str(wh), "--last", "1", "--json")
    assert [json.loads(x)["run_id"] for x in last.stdout.splitlines()] == [failed["run_id"]]

    show = _finfeat("runs", "show", failed["run_id"][:20], "--warehouse", str(wh))
    assert show.returncode == 0, show.stderr
    whole = json.loads(show.stdout)
    assert whole["status"] == "failed" and whole["failures"] and whole["_commits"] == []

    missing = _finfeat("runs", "show", "nope", "--warehouse", str(wh))
    assert missing.returncode == 2 and "finfeat runs` lists the run ids" in missing.stderr
