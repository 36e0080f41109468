"""Expectations inside the backfill: drop quarantines, fail stops the run before any commit."""
from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.jobs.delta import read_table
from finfeat.schemas.mapping import Mapping
from finfeat.validation.validate import ValidationFailed
from tests.conftest import RUNNER, SPARKOV_TEST, TOKEN_KEY

BIG = 50_000  # minor units: a few hundred Sparkov rows are larger


def _suite(tmp_path: Path, policy: str) -> Path:
    path = tmp_path / f"suite_{policy}.yaml"
    path.write_text(f"""name: capped
expectations:
  - name: amount_at_most_500_dollars
    policy: {policy}
    type: expect_column_values_to_be_between
    columns: [amount_minor]
    kwargs: {{min_value: 0, max_value: {BIG}}}
  - name: counts_not_negative
    policy: fail
    type: expect_column_values_to_be_between
    columns: [card_count_24h]
    kwargs: {{min_value: 0}}
""")
    return path


def _cfg(wh: Path, suite: str | Path | None, max_fraction: float = 0.5) -> BackfillConfig:
    return BackfillConfig(inputs=[SPARKOV_TEST], mapping=Mapping.load("sparkov"), warehouse=wh,
                          start=date(2020, 6, 21), end=date(2020, 6, 22), token_key=TOKEN_KEY,
                          beam_args=[f"--runner={RUNNER}"], buckets=2,
                          feature_suite=str(suite) if suite else None, max_quarantine_fraction=max_fraction)


@pytest.fixture()
def landed(tmp_path: Path) -> Path:
    report = run_backfill(_cfg(tmp_path, "features"))
    assert report["validation"]["failures"] == []
    assert report["features_written"] == 5_116
    return tmp_path


def test_drop_quarantines_exactly_the_breaking_rows(landed: Path, tmp_path: Path) -> None:
    report = run_backfill(_cfg(landed, _suite(tmp_path, "drop")))
    features = read_table(landed / "features")
    big = pc.sum(pc.greater(features.column("amount_minor"), BIG)).as_py()
    assert big == 0
    quarantined = read_table(landed / "quarantine" / "features")
    assert quarantined.num_rows == report["validation"]["quarantined"] > 0
    assert features.num_rows + quarantined.num_rows == 5_116
    assert pc.min(quarantined.column("amount_minor")).as_py() > BIG
    assert all(names == ["amount_at_most_500_dollars[amount_minor]"]
               for names in quarantined.column("broken_expectations").to_pylist())


def test_warn_only_counts(landed: Path, tmp_path: Path) -> None:
    report = run_backfill(_cfg(landed, _suite(tmp_path, "warn")))
    assert report["features_written"] == 5_116
    assert report["validation"]["warnings"]["amount_at_most_500_dollars[amount_minor]"] > 0
    assert not (landed / "quarantine").exists()


@pytest.mark.parametrize("why", ["fail_policy", "quarantine_fraction"])
def test_a_failing_run_commits_nothing(landed: Path, tmp_path: Path, why: str) -> None:
    versions = {t: DeltaTable(str(landed / t)).version() for t in ("features", "dead_letters", "labels")}
    cfg = _cfg(landed, _suite(tmp_path, "fail")) if why == "fail_policy" else \
        _cfg(landed, _suite(tmp_path, "drop"), max_fraction=0.001)
    with pytest.raises(ValidationFailed) as exc:
        run_backfill(cfg)
    assert "amount_at_most_500_dollars" in str(exc.value) or "quarantine" in str(exc.value)
    assert {t: DeltaTable(str(landed / t)).version() for t in versions} == versions
    assert not (landed / "quarantine").exists()


def test_cli_exit_code_names_the_expectation(landed: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "finfeat.jobs.cli", "backfill", "--input", str(SPARKOV_TEST),
                           "--mapping", "sparkov", "--start", "2020-06-21", "--end", "2020-06-22", "--demo-key",
                           "--warehouse", str(landed), "--feature-suite", str(_suite(tmp_path, "fail")),
                           f"--runner={RUNNER}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "amount_at_most_500_dollars" in proc.stderr and "nothing was committed" in proc.stderr
