"""The CLI: exit codes and messages for a bad flag, a missing file, a broken mapping or spec."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from finfeat.jobs.delta import read_table

from finfeat.jobs.cli import main
from tests.conftest import RUNNER, SPARKOV_TEST


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


BASE = ["backfill", "--input", str(SPARKOV_TEST), "--mapping", "sparkov", "--start", "2020-06-21",
        "--end", "2020-06-22", "--demo-key"]


def test_unknown_flag_fails_fast_and_names_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = _run(capsys, *BASE, "--warehouse", str(tmp_path), "--runnr=FnApiRunner")
    assert code == 2
    assert "--runnr=FnApiRunner" in text and "not a Beam pipeline option" in text
    assert not (tmp_path / "features").exists()


def test_bad_date_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["backfill", "--input", "x", "--start", "21/06/2020", "--end", "2020-06-22"])
    assert exc.value.code == 2
    assert "use YYYY-MM-DD" in capsys.readouterr().err


def test_end_before_start(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = _run(capsys, *BASE[:-5], "--start", "2020-06-22", "--end", "2020-06-21", "--demo-key",
                      "--warehouse", str(tmp_path))
    assert code == 2 and "is before --start" in text


def test_missing_input_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text = _run(capsys, "backfill", "--input", str(tmp_path / "nope.csv"), "--start", "2020-01-01",
                      "--end", "2020-01-02", "--demo-key", "--warehouse", str(tmp_path))
    assert code == 2 and "nope.csv does not exist" in text


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("fields: {txn_id: {column: a}}", "fields.merchant_id: Field required"),
    ("fields:\n  txn_id: {column: trans_num}\n  card_number: {column: cc_num}\n  merchant_id: {column: merchant}\n"
     "  amount: {column: amt, scale: 2}\n  currency: {constant: XXQ}\n"
     "  event_time: {column: trans_date_trans_time, format: '%Y-%m-%d %H:%M:%S'}\n", "not an ISO-4217 currency"),
    ("fields: [oops", "not valid YAML"),
])
def test_broken_mapping_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path, yaml_text: str,
                                 message: str) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text(yaml_text)
    args = list(BASE)
    args[args.index("sparkov")] = str(mapping)
    code, text = _run(capsys, *args, "--warehouse", str(tmp_path))
    assert code == 2 and message in text and "m.yaml" in text


def test_mapping_naming_a_missing_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text(Path(__file__).resolve().parents[1].joinpath("jobs/mappings/sparkov.yaml").read_text()
                       .replace("column: merch_lat", "column: merchant_latitude"))
    args = list(BASE)
    args[args.index("sparkov")] = str(mapping)
    code, text = _run(capsys, *args, "--warehouse", str(tmp_path))
    assert code == 2 and "merchant_latitude" in text and "merch_lat" in text
    assert not (tmp_path / "features").exists()


def test_missing_token_key_says_how_to_set_it(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINFEAT_TOKEN_KEY", raising=False)
    code, text = _run(capsys, *BASE[:-1], "--warehouse", str(tmp_path))
    assert code == 2 and "FINFEAT_TOKEN_KEY" in text


def test_broken_feature_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("features:\n  - {entity: card, agg: sum, window: 24h}\n")
    code, text = _run(capsys, *BASE, "--feature-spec", str(spec), "--warehouse", str(tmp_path))
    assert code == 2 and "sum needs field: amount" in text


def test_backfill_command_succeeds_and_prints_the_summary(tmp_path: Path) -> None:
    env = {**os.environ, "FINFEAT_TOKEN_KEY": "cli-test-key-0123456789"}
    proc = subprocess.run([sys.executable, "-m", "finfeat.jobs.cli", *BASE[:-1], "--warehouse", str(tmp_path),
                           f"--runner={RUNNER}", "--direct_num_workers=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reconciled         yes: 5,116 = 5,116 accepted + 0 dead letters" in proc.stdout
    assert read_table(str(tmp_path / "features")).num_rows == 5_116
