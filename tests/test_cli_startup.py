"""The CLI starts without the heavy libraries: ``--help`` and a bad flag import none of them."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from finfeat.jobs import cli

HEAVY = ("apache_beam", "great_expectations", "deltalake", "pyarrow", "pandas")

_PROBE = """
import sys
from finfeat.jobs.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print("EXIT", exc.code)
print("LOADED", " ".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["backfill", "--input", "x", "--start", "nope", "--end", "2020-01-01"],
    ["backfill", "--help"],
    ["validate", "--help"],
])
def test_help_and_bad_flags_import_no_heavy_library(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv],
                         capture_output=True, text=True, check=True).stdout
    assert "EXIT" in out  # argparse exited (help or usage error), as the user sees it
    loaded = out.split("LOADED", 1)[1].split()
    assert loaded == [], f"{argv} imported {loaded}"


def _choices_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help for a in sub._choices_actions}


@pytest.mark.parametrize("command", sorted(cli.LATE_COMMAND_HELP))
def test_listed_help_is_the_commands_own(command: str) -> None:
    """``finfeat --help`` lists a late command with the same line its module registers."""
    listed = _choices_help(cli._parser())[command]
    own = _choices_help(cli._parser(command))[command]
    assert listed == own
