"""``make stream-demo`` end to end: a backfill, then the same transactions through a real broker,
``finfeat stream`` on Prism and an online store, checked by the demo itself against the backfill.
Skipped when Kafka's jars or Prism are missing, unless CI is set."""
from __future__ import annotations

from pathlib import Path

import pytest

from finfeat.jobs import stream_demo
from finfeat.jobs.cli import main as cli
from finfeat.jobs.delta import read_table
from tests.conftest import SPARKOV_TEST
from tests.stream_fixtures import require_stream_stack


@pytest.mark.parametrize("engine", ["beam", "flink"])
def test_stream_demo_matches_the_backfill(tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str) -> None:
    if engine == "flink":  # make flink-demo: a local Flink cluster instead of Prism
        from tests.test_stream_flink import require_flink_stack

        require_flink_stack()
    else:
        require_stream_stack()
    wh = tmp_path / "warehouse"
    assert cli(["backfill", "--input", str(SPARKOV_TEST), "--mapping", "sparkov", "--start", "2020-06-21",
                "--end", "2020-06-22", "--demo-key", "--warehouse", str(wh), "--runner=FnApiRunner"]) == 0
    capsys.readouterr()
    assert stream_demo.main(["--warehouse", str(wh), "--input", str(SPARKOV_TEST), "--engine", engine]) == 0
    out = capsys.readouterr().out
    rows = read_table(wh / "features", columns=["txn_id"]).num_rows
    assert f"{rows:,} messages -> {rows:,} feature rows + 0 dead letters" in out, out
    assert "identical to the backfill's rows" in out, out
    assert "online lookup" in out and "state age 60 s" in out, out
    out_dir = Path(f"{wh}-flink" if engine == "flink" else f"{wh}-stream")
    assert read_table(out_dir / "features", columns=["txn_id"]).num_rows == rows


def test_stream_demo_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stream_demo.main(["--warehouse", str(tmp_path / "nothing")]) == 2
    assert "run `make demo` first" in capsys.readouterr().err
