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


@pytest.mark.parametrize("at_once", [None, 700])
def test_the_run_reports_what_the_whole_table_gives(landed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    at_once: int | None) -> None:
    """Row-local expectations run where the rows are computed (``at_once`` rows at a time), the
    others on the gathered columns: the run's outcome is the one of the suite on the whole
    committed table."""
    from finfeat.jobs.backfill import WriteFeatureFilesFn
    from finfeat.jobs.runs import read_reports
    from finfeat.validation.validate import QuarantinePolicy, validate_table

    wh = landed
    if at_once is not None:
        monkeypatch.setattr(WriteFeatureFilesFn, "VALIDATE_ROWS", at_once)
        wh = tmp_path / "in_parts"
        run_backfill(_cfg(wh, "features"))
    (report,) = [r for r in read_reports(wh).values() if r.get("status") == "succeeded"]
    whole = validate_table(read_table(wh / "features"), "features", policy=QuarantinePolicy(0.5),
                           missing_columns="skip").summary()
    got = dict(report["validation"])
    assert got.pop("seconds") >= 0 and whole.pop("seconds") >= 0
    assert got == whole and got["rows"] == 5_116


def test_whole_table_expectations_that_drop_rows(landed: Path, tmp_path: Path) -> None:
    """A uniqueness expectation with policy drop (it needs every row at once) and a row-local
    one: every copy of a repeated amount and every amount above the cap is quarantined, with
    the names of the expectations each row broke, and the rest is committed."""
    import dataclasses

    CAP = 10_000  # noqa: N806  (low enough that some repeated amounts are above it)
    suite = tmp_path / "unique.yaml"
    suite.write_text(f"""name: unique_amounts
expectations:
  - name: amount_unique
    policy: drop
    type: expect_column_values_to_be_unique
    kwargs: {{column: amount_minor}}
  - name: amount_capped
    policy: drop
    type: expect_column_values_to_be_between
    kwargs: {{column: amount_minor, max_value: {CAP}}}
""")
    before = read_table(landed / "features")
    amounts = before.column("amount_minor").to_pylist()
    seen: dict[int, int] = {}
    for a in amounts:
        seen[a] = seen.get(a, 0) + 1
    expected = {}
    for txn, a in zip(before.column("txn_id").to_pylist(), amounts):
        broken = (["amount_unique"] if seen[a] > 1 else []) + (["amount_capped"] if a > CAP else [])
        if broken:
            expected[txn] = broken
    assert 0 < len(expected) < before.num_rows
    assert any(len(b) == 2 for b in expected.values()) and any(b == ["amount_capped"] for b in expected.values())

    report = run_backfill(dataclasses.replace(_cfg(landed, suite, max_fraction=1.0), allow_shrink=True))
    after = read_table(landed / "features")
    quarantined = read_table(landed / "quarantine" / "features")
    assert sorted(after.column("txn_id").to_pylist()) == sorted(set(before.column("txn_id").to_pylist()) - set(expected))
    assert dict(zip(quarantined.column("txn_id").to_pylist(),
                    quarantined.column("broken_expectations").to_pylist())) == expected
    assert report["features_written"] == after.num_rows and report["validation"]["quarantined"] == len(expected)
