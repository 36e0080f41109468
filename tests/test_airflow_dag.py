"""The shipped Airflow DAG, in Airflow's own test mode (``dag.test()``), in the Airflow virtualenv.

Airflow runs in ``.venv-airflow`` (``make airflow``), never in the main environment: these tests
drive it as a subprocess on a temporary AIRFLOW_HOME with Airflow's embedded defaults (SQLite
metadata database), and compare what the DAG wrote with plain backfills run here.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from finfeat.jobs.cli import main
from finfeat.jobs.generate import generate
from tests.catchup_fixtures import FIRST_DAY, day, features_sorted
from tests.conftest import REPO, RUNNER, unavailable

AIRFLOW_PYTHON = REPO / ".venv-airflow" / "bin" / "python"
DAG_FILE = REPO / "jobs" / "airflow" / "finfeat_dag.py"


def require_airflow() -> None:
    """Skip when the Airflow virtualenv is missing, unless CI is set: then fail."""
    if AIRFLOW_PYTHON.exists():
        return
    unavailable(f"Airflow environment {AIRFLOW_PYTHON} missing (make airflow)")


class AirflowHome:
    """A throwaway AIRFLOW_HOME with the DAG dropped into its DAGs folder and finfeat configured by
    the ``finfeat`` Variable (from the environment)."""

    def __init__(self, root: Path, config: dict[str, object]) -> None:
        self.root = root
        (root / "dags").mkdir(parents=True)
        shutil.copy(DAG_FILE, root / "dags" / DAG_FILE.name)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FINFEAT_"))}
        self.env.update({
            "AIRFLOW_HOME": str(root), "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "FINFEAT_DAG_START_DATE": (day(2)).isoformat(),
            "FINFEAT_DAG_RETRIES": "0", "AIRFLOW_VAR_FINFEAT": json.dumps(config),
        })
        self.run(["-m", "airflow", "db", "migrate"])

    def run(self, args: list[str], timeout: float = 1200, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(AIRFLOW_PYTHON), *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        (self.root / "last.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0 or not check, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc

    def dag_test(self, *logical_dates: str, conf: dict[str, object] | None = None) -> list[dict[str, str]]:
        conf_args = ["--conf", json.dumps(conf)] if conf else []
        proc = self.run([str(self.root / "dags" / DAG_FILE.name), *conf_args, *logical_dates], check=False)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"finfeat_dag_test"')]


def _backfill(inputs: Path, warehouse: Path, end: int) -> pa.Table:
    assert main(["backfill", "--input", str(inputs), "--mapping", "generated", "--warehouse", str(warehouse),
                 "--start", day(1).isoformat(), "--end", day(end).isoformat(), "--demo-key",
                 f"--runner={RUNNER}"]) == 0
    return features_sorted(warehouse)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_airflow()
    root = tmp_path_factory.mktemp("airflow")
    inputs = root / "inputs"
    inputs.mkdir()
    whole = root / "all.parquet"
    generate(out=whole, events=1500, seed=5, start=FIRST_DAY.isoformat(), days=8, cards=80, merchants=32)
    table = pq.read_table(whole)
    # a tenth of day 2's events arrives late, during the outage
    on_day2 = pc.equal(pc.cast(table.column("event_time"), pa.date32()), pa.scalar(day(2))).to_numpy(
        zero_copy_only=False)
    late = on_day2 & _every_tenth(table.num_rows)
    pq.write_table(table.filter(pa.array(~late)), inputs / "events.parquet")
    pq.write_table(table.filter(pa.array(late)), root / "late.parquet")
    home = AirflowHome(root / "home", {"inputs": [str(inputs)], "mapping": "generated", "demo_key": True,
                                       "warehouse": str(root / "wh"),
                                       "online_store": f"sqlite:{root / 'online.db'}"})
    return {"root": root, "inputs": inputs, "late": root / "late.parquet", "home": home}  # type: ignore[dict-item]


def _every_tenth(n: int):  # noqa: ANN202
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    mask[::10] = True
    return mask


def test_dag_parses_without_import_errors(deployment: dict[str, object]) -> None:
    home = deployment["home"]
    script = ("import json; from airflow.dag_processing.dagbag import DagBag; "
              f"b = DagBag(dag_folder={str(home.root / 'dags')!r}); "
              "d = b.dags.get('finfeat_backfill'); "
              "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()}, "
              "'tasks': d.task_ids if d else None, 'catchup': d.catchup if d else None, "
              "'retries': d.task_dict['catch_up'].retries if d else None, "
              "'backoff': d.task_dict['catch_up'].retry_exponential_backoff if d else None}))")
    proc = home.run(["-c", script])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert out["tasks"] == ["catch_up", "validate", "refresh_online_store"]
    assert out["catchup"] is True and out["backoff"] is True


def test_three_daily_runs_equal_one_backfill(deployment: dict[str, object]) -> None:
    home, root = deployment["home"], deployment["root"]
    # logical dates day 2..4 backfill their previous days 1..3
    states = home.dag_test(day(2).isoformat(), day(3).isoformat(), day(4).isoformat())
    assert [s["state"] for s in states] == ["success"] * 3, states
    expected = _backfill(deployment["inputs"], root / "single-3", end=3)
    got = features_sorted(root / "wh")
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected.select(got.column_names))
    # the store was refreshed by the last run's catch-up of its day
    with sqlite3.connect(root / "online.db") as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
    assert tables


def test_an_outage_heals_in_one_run(deployment: dict[str, object]) -> None:
    home, root = deployment["home"], deployment["root"]
    # the DAG did not run for logical dates day 5, 6, 7; meanwhile late events of day 2 arrived
    shutil.copy(deployment["late"], deployment["inputs"] / "late.parquet")
    states = home.dag_test(day(8).isoformat())
    assert [s["state"] for s in states] == ["success"]
    expected = _backfill(deployment["inputs"], root / "single-7", end=7)
    got = features_sorted(root / "wh")
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected.select(got.column_names))
    # the run history shows the heal: one catch-up range from the late day to the run's day
    reports = [json.loads(p.read_text()) for p in sorted((root / "wh" / "_runs").glob("*.json"))]
    ranges = [r["range"] for r in reports if r.get("catch_up")]
    assert f"{day(2)}..{day(7)}" in ranges


def test_a_failed_suite_fails_the_dag_run(deployment: dict[str, object]) -> None:
    from tests.test_runs import IMPOSSIBLE_SUITE

    home, root = deployment["home"], deployment["root"]
    suite = root / "impossible.yaml"
    suite.write_text(IMPOSSIBLE_SUITE)
    states = home.dag_test(day(9).isoformat(), conf={"validate_suite": str(suite)})
    assert [s["state"] for s in states] == ["failed"]
    log = (home.root / "last.log").read_text()
    assert "finfeat validate" in log and "failed (exit 1)" in log
    # the catch-up ran (day 8 is written once), the store refresh did not (it would write day 8 again)
    reports = [json.loads(p.read_text()) for p in (root / "wh" / "_runs").glob("*.json")]
    assert [r["range"] for r in reports].count(f"{day(8)}..{day(8)}") == 1
