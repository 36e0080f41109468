"""The CLI's surface: help texts, --version, `finfeat features`, `finfeat init` and finfeat.yaml."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finfeat import __version__
from finfeat.jobs import project
from finfeat.jobs.cli import _parser, main
from finfeat.transforms.spec import FeatureSpec

_RST = re.compile(r"``|:(?:mod|class|func|meth|attr|data|exc|obj):`")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def test_every_help_text_is_plain_and_every_flag_described() -> None:
    parser = _parser()
    subs = _subparsers(parser)
    assert {"serve", "features", "init", "training-set", "backfill", "score"} <= set(subs)
    assert not _RST.search(parser.format_help())
    subs = {name: _subparsers(_parser(name))[name] for name in subs}  # each command's complete parser
    for name, sub in subs.items():
        text = sub.format_help()
        assert not _RST.search(text), f"{name} --help shows reStructuredText: {_RST.search(text).group(0)}"
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"finfeat {name} {action.option_strings[0]} has no description"
    # defaults are shown
    assert "(default: 1000000)" in subs["generate"].format_help()
    assert re.search(r"--port PORT\s+TCP port.*\(default:\s+8000\)", subs["serve"].format_help(), re.S)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"finfeat {__version__}"


def test_features_list_json_and_describe(capsys: pytest.CaptureFixture[str]) -> None:
    spec = FeatureSpec.default()
    assert main(["features"]) == 0
    table = capsys.readouterr().out
    for f in spec.features:
        assert re.search(rf"^{f.name}\s+{f.entity}\s+{f.agg}\b", table, re.M), f.name
    assert main(["features", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec_hash"] == spec.spec_hash
    assert [r["name"] for r in doc["features"]] == spec.names
    std = next(r for r in doc["features"] if r["name"] == "card_std_amount_30d")
    assert std["window"] == "30d" and std["type"] == "double" and "fewer than 2" in std["nulls"]
    assert main(["features", "describe", "merchant_count_24h", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["entity"] == "merchant" and one["reach_seconds"] == 86_400 and "window_rule" in one
    assert main(["features", "describe", "card_count_2h"]) == 2
    assert re.search(r"did you mean .*card_count_1h", capsys.readouterr().err)


def _spec_file(path: Path, window: str) -> Path:
    path.write_text(f"version: 1\nfeatures:\n  - {{entity: card, agg: count, window: {window}}}\n")
    return path


def test_init_and_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert main(["init"]) == 2 and "--force" in capsys.readouterr().err
    written = project.load(tmp_path / "finfeat.yaml")
    assert written.warehouse == "warehouse" and written.online_store == "sqlite:online.db"

    _spec_file(tmp_path / "two_hours.yaml", "2h")
    _spec_file(tmp_path / "three_days.yaml", "3d")
    (tmp_path / "finfeat.yaml").write_text(
        "warehouse: wh\nmapping: sparkov\nfeature_spec: two_hours.yaml\nonline_store: sqlite:state.db\n"
        "runner: {flags: ['--direct_num_workers=2']}\nserve: {port: 9123}\n")
    # the file's values are every command's defaults ...
    assert main(["features", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)["features"]] == ["card_count_2h"]
    # ... and a flag wins
    assert main(["features", "--json", "--feature-spec", "three_days.yaml"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)["features"]] == ["card_count_3d"]

    config, base, argv = project.config_for(["serve", "--port", "9000"])

    def parser_for(command: str):  # the CLI builds only the running command's parser in full
        parser = _parser(command)
        project.apply(parser, config, base)
        return parser

    args = parser_for("serve").parse_args(argv)
    assert (args.store, args.port) == ("sqlite:state.db", 9000)
    args, _ = parser_for("backfill").parse_known_args(["backfill", "--input", "x", "--start", "2020-01-01",
                                                       "--end", "2020-01-02"])
    assert (args.warehouse, args.mapping, args.online_store) == ("wh", "sparkov", "sqlite:state.db")
    args = parser_for("serve-lookup").parse_args(["serve-lookup", "--card-token", "c", "--merchant-id", "m",
                                                  "--amount-minor", "1", "--at", "2020-01-01T00:00:00Z"])
    assert args.store == "sqlite:state.db"  # no longer a required flag: the file gives it
    args = parser_for("score").parse_args(["score", "--model", "m", "--json", "{}"])
    assert args.store is None  # score --json without --store scores a feature row, whatever the file says
    # the file's Beam flags reach Beam (an unknown one fails before any data is read) ...
    (tmp_path / "finfeat.yaml").write_text("runner: {flags: ['--not_a_beam_flag=1']}\n")
    from tests.conftest import SPARKOV_TEST

    bf = ["backfill", "--input", str(SPARKOV_TEST), "--mapping", "sparkov", "--start", "2020-06-21",
          "--end", "2020-06-21", "--demo-key", "--warehouse", str(tmp_path / "wh")]
    assert main(bf) == 2
    assert "--not_a_beam_flag=1" in capsys.readouterr().err
    assert not (tmp_path / "wh").exists()
    (tmp_path / "finfeat.yaml").write_text(
        "warehouse: wh\nmapping: sparkov\nfeature_spec: two_hours.yaml\nonline_store: sqlite:state.db\n")

    # --config PATH from elsewhere: relative paths are relative to the file
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert main(["features", "--json"]) == 0  # no finfeat.yaml here: the built-in spec
    assert len(json.loads(capsys.readouterr().out)["features"]) == len(FeatureSpec.default().features)
    assert main(["--config", str(tmp_path / "finfeat.yaml"), "features", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)["features"]] == ["card_count_2h"]
    assert main(["features", "--config", "../finfeat.yaml", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)["features"]] == ["card_count_2h"]


@pytest.mark.parametrize(("text", "message"), [
    ("warehouse: wh\ncolour: red\n", "colour: unknown key (known: warehouse, mapping"),
    ("serve: {port: 70000}\n", "serve.port: Input should be less than or equal to 65535"),
    ("serve: {tokn_env: X}\n", "serve.tokn_env: unknown key (known: host, port, token_env"),
    ("online_store: postgres://x\n", "not a store URL"),
    ("runner: {flags: [runner=Prism]}\n", "each Beam flag starts with --"),
    ("- a\n- b\n", "must be a mapping"),
    ("warehouse: [unclosed\n", "not valid YAML"),
])
def test_bad_config_fails_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "finfeat.yaml").write_text(text)
    assert main(["features"]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "features"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verbose_shows_finfeat_logs_not_library_noise(tmp_path: Path) -> None:
    """-v: finfeat's INFO lines, no library INFO lines (-vv has those)."""
    code = ("import logging, sys; from finfeat.jobs.cli import main; "
            "main(sys.argv[1:]); logging.getLogger('finfeat.jobs.x').info('ours'); "
            "logging.getLogger('apache_beam.runners').info('theirs')")
    one = subprocess.run([sys.executable, "-c", code, "-v", "features"], capture_output=True, text=True, cwd=tmp_path)
    assert "ours" in one.stderr and "theirs" not in one.stderr
    two = subprocess.run([sys.executable, "-c", code, "-vv", "features"], capture_output=True, text=True, cwd=tmp_path)
    assert "ours" in two.stderr and "theirs" in two.stderr


def test_a_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "xgboost", None)  # as if the [train] extra were not installed
    assert main(["score", "--model", str(tmp_path), "--json", "{}"]) == 2
    err = capsys.readouterr().err
    assert "[train] extra" in err and "make setup-full" in err


def test_a_sparkov_file_without_mapping_hints_the_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import SPARKOV_TEST

    code = main(["backfill", "--input", str(SPARKOV_TEST), "--start", "2020-06-21", "--end", "2020-06-21",
                 "--demo-key", "--warehouse", str(tmp_path)])
    assert code == 2
    assert "pass --mapping sparkov" in capsys.readouterr().err


def test_backfill_summary_and_an_empty_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import RUNNER, SPARKOV

    base = ["backfill", "--input", str(SPARKOV), "--mapping", "sparkov", "--demo-key", "--no-validate",
            "--warehouse", str(tmp_path), f"--runner={RUNNER}"]
    assert main([*base, "--start", "2020-06-22", "--end", "2020-06-22"]) == 0
    out = capsys.readouterr().out
    got = {k: int(v.replace(",", "")) for k, v in re.findall(r"^\s+(in the range|history|ignored|events accepted)"
                                                               r"\s+([\d,]+)", out, re.M)}
    written = int(re.search(r"features written\s+([\d,]+)", out).group(1).replace(",", ""))
    assert got["in the range"] == written > 0
    assert got["history"] > 0 and got["ignored"] > 0  # the files span 2019 and 2020-06-21..22
    assert got["in the range"] + got["history"] + got["ignored"] == got["events accepted"]
    assert main([*base, "--start", "2021-01-01", "--end", "2021-01-02"]) == 1
    assert "no event of the input falls in 2021-01-01..2021-01-02" in capsys.readouterr().err


def test_train_report_states_the_real_gap() -> None:
    from datetime import date

    from finfeat.jobs.train import TrainConfig

    w = TrainConfig(warehouse="w", train_start=date(2019, 1, 1), train_end=date(2019, 1, 15),
                    test_start=date(2020, 6, 21), test_end=date(2020, 6, 22)).windows()
    assert (w["gap_days"], w["actual_gap_days"]) == (7, 522)
