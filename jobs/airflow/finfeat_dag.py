"""finfeat's scheduled backfill as an Apache Airflow 3 DAG: drop this file into a DAGs folder.

Each daily run (logical date L) works on the previous UTC day D = L - 1 day:

1. ``catch_up``: ``finfeat backfill --catch-up --end D`` recomputes every day up to D that is
   missing or stale (never written, changed input, late labels, another spec or code version),
   so a run after an outage heals every day the outage left behind. Retried with exponential
   backoff.
2. ``validate``: ``finfeat validate`` on the days just computed (or D); a failed suite fails the
   DAG run (no retry: data does not get better by waiting).
3. ``refresh_online_store``: ``finfeat backfill --catch-up --start D --end D --online-store S``
   recomputes D and writes the store, so it holds the state as of the end of D (and the run history
   records it like any catch-up run); skipped when no store is configured.

Configuration, first found wins, key by key: the run's params (``airflow dags trigger --conf``),
the Airflow Variable ``finfeat`` (a JSON object; also ``AIRFLOW_VAR_FINFEAT`` in the environment),
then the defaults below. Keys: ``inputs`` (list of files or folders, required), ``warehouse``,
``mapping``, ``labels`` (list), ``feature_spec``, ``feature_suite`` (the backfill's gate),
``validate_suite`` (the validate task's suite, default ``feature_suite``), ``validate_args``
(more ``finfeat validate`` flags, e.g. a drift reference), ``online_store``,
``runner_args`` (Beam flags, e.g. ``["--runner=PrismRunner"]``), ``history_start`` (first day the
catch-up considers; default: the first day of the input), ``finfeat_bin`` (the ``finfeat``
executable; default: the one beside this Python), ``token_key_variable`` (an Airflow Variable
holding the tokenization key, default ``finfeat_token_key``; else ``FINFEAT_TOKEN_KEY`` of the
worker), ``demo_key`` (test data only).

Parse-time settings come from the environment (a DAG file must not query the metadata database
when it is parsed): ``FINFEAT_DAG_START_DATE`` (default 2024-01-01), ``FINFEAT_DAG_SCHEDULE``
(default ``@daily``), ``FINFEAT_DAG_RETRIES`` (default 3), ``FINFEAT_DAG_RETRY_DELAY_S`` (default 300).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, Variable, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

DAG_ID = "finfeat_backfill"
CONFIG_VARIABLE = "finfeat"
DEFAULTS: dict[str, Any] = {
    "inputs": [],
    "warehouse": str(Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "finfeat" / "warehouse"),
    "mapping": "generated",
    "labels": [],
    "feature_spec": None,
    "feature_suite": "features",
    "validate_suite": None,
    "validate_args": [],
    "online_store": None,
    "runner_args": [],
    "history_start": None,
    "finfeat_bin": None,
    "token_key_variable": "finfeat_token_key",
    "demo_key": False,
}


def _config(params: dict[str, Any]) -> dict[str, Any]:
    try:
        stored = Variable.get(CONFIG_VARIABLE, default=None, deserialize_json=True) or {}
    except Exception as exc:  # noqa: BLE001  (no such variable / no metadata access: defaults apply)
        print(f"finfeat: Airflow Variable {CONFIG_VARIABLE!r} not read ({exc}); using params and defaults")
        stored = {}
    if not isinstance(stored, dict):
        raise AirflowFailException(f"the Airflow Variable {CONFIG_VARIABLE!r} must be a JSON object")
    unknown = sorted((set(stored) | {k for k, v in params.items() if v is not None}) - set(DEFAULTS))
    if unknown:
        raise AirflowFailException(f"unknown finfeat setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {k: params[k] if params.get(k) is not None else stored.get(k, default) for k, default in DEFAULTS.items()}
    if not cfg["inputs"]:
        raise AirflowFailException("no inputs: set \"inputs\" (a list of files or folders) in the Airflow Variable "
                                   f"{CONFIG_VARIABLE!r} or in the run's params")
    for key in ("inputs", "labels", "runner_args", "validate_args"):
        if isinstance(cfg[key], str):
            cfg[key] = [cfg[key]]
    return cfg


def _finfeat_bin(cfg: dict[str, Any]) -> str:
    if cfg["finfeat_bin"]:
        return str(cfg["finfeat_bin"])
    beside = Path(sys.executable).with_name("finfeat")
    found = str(beside) if beside.exists() else shutil.which("finfeat")
    if not found:
        raise AirflowFailException("no finfeat executable: install finfeat into the workers' environment or set "
                                   "\"finfeat_bin\"")
    return found


def _env(cfg: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    try:
        key = Variable.get(cfg["token_key_variable"], default=None) if cfg["token_key_variable"] else None
    except Exception:  # noqa: BLE001
        key = None
    if key:
        env["FINFEAT_TOKEN_KEY"] = key
    return env


def _run(cfg: dict[str, Any], args: list[str]) -> tuple[int, str]:
    """Run ``finfeat args``; its output goes to the task log line by line."""
    cmd = [_finfeat_bin(cfg), *args]
    print("finfeat: running " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(cfg))
    out = []
    for line in proc.stdout or []:
        out.append(line)
        print(line.rstrip("\n"), flush=True)
    return proc.wait(), "".join(out)


def _backfill_args(cfg: dict[str, Any]) -> list[str]:
    args = [a for p in cfg["inputs"] for a in ("--input", str(p))]
    args += ["--mapping", cfg["mapping"], "--warehouse", cfg["warehouse"]]
    args += [a for p in cfg["labels"] for a in ("--labels", str(p))]
    if cfg["feature_spec"]:
        args += ["--feature-spec", cfg["feature_spec"]]
    if cfg["feature_suite"]:
        args += ["--feature-suite", cfg["feature_suite"]]
    if cfg["demo_key"]:
        args.append("--demo-key")
    return args


def _target_day(logical_date: Any) -> date:
    """The previous UTC day of the run's logical date."""
    return pendulum.instance(logical_date).in_timezone("UTC").date() - timedelta(days=1)


_RETRIES = int(os.environ.get("FINFEAT_DAG_RETRIES", "3"))
_RETRY_DELAY = timedelta(seconds=float(os.environ.get("FINFEAT_DAG_RETRY_DELAY_S", "300")))

with DAG(
    dag_id=DAG_ID,
    description="finfeat: daily catch-up backfill of the previous UTC day, data-quality gate, online store refresh",
    schedule=os.environ.get("FINFEAT_DAG_SCHEDULE", "@daily"),
    start_date=pendulum.parse(os.environ.get("FINFEAT_DAG_START_DATE", "2024-01-01"), tz="UTC"),
    catchup=True,
    max_active_runs=1,  # one catch-up at a time: each plans from the history the previous one wrote
    default_args={"retries": _RETRIES, "retry_delay": _RETRY_DELAY, "retry_exponential_backoff": True,
                  "max_retry_delay": timedelta(hours=2)},
    params={k: Param(None, type=["null", "string", "array", "boolean"], description=f"overrides {k}")
            for k in DEFAULTS},
    tags=["finfeat"],
) as dag:

    @task
    def catch_up(params: dict[str, Any] | None = None, logical_date: Any = None) -> dict[str, Any]:
        cfg = _config(params or {})
        day = _target_day(logical_date)
        with tempfile.TemporaryDirectory(prefix="finfeat-plan-") as tmp:
            plan_path = Path(tmp) / "plan.json"
            args = ["backfill", "--catch-up", *_backfill_args(cfg), "--end", day.isoformat(),
                    "--plan-json", str(plan_path), "--log-format", "json", *cfg["runner_args"]]
            if cfg["history_start"]:
                args += ["--start", str(cfg["history_start"])]
            code, _ = _run(cfg, args)
            if code == 2:
                raise AirflowFailException("finfeat rejected the configuration (exit 2); see the log above")
            if code != 0:
                raise RuntimeError(f"finfeat backfill --catch-up exited {code}")
            summary = json.loads(plan_path.read_text())
        days = sorted(summary["plan"]["days"])
        return {"day": day.isoformat(), "days": days, "runs": summary["runs"]}

    @task(retries=0)
    def validate(result: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        cfg = _config(params or {})
        days = [*result["days"], result["day"]]
        lo, hi = min(days), max(days)
        suite = cfg["validate_suite"] or cfg["feature_suite"] or "features"
        code, out = _run(cfg, ["validate", "--table", str(Path(cfg["warehouse"]) / "features"), "--suite", suite,
                               "--start", lo, "--end", hi, *cfg["validate_args"]])
        if code == 2 and "no rows to check" in out:
            raise AirflowSkipException(f"no feature rows in {lo}..{hi}: nothing to validate")
        if code != 0:
            raise AirflowFailException(f"finfeat validate {lo}..{hi} failed (exit {code}): see the results above")

    @task(trigger_rule="none_failed")
    def refresh_online_store(result: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        cfg = _config(params or {})
        if not cfg["online_store"]:
            raise AirflowSkipException("no online_store configured")
        day = result["day"]
        code, _ = _run(cfg, ["backfill", "--catch-up", *_backfill_args(cfg), "--start", day, "--end", day,
                             "--online-store", cfg["online_store"], "--log-format", "json", *cfg["runner_args"]])
        if code != 0:
            raise RuntimeError(f"finfeat backfill --catch-up --online-store exited {code}")

    computed = catch_up()
    checked = validate(computed)
    refreshed = refresh_online_store(computed)
    checked >> refreshed


if __name__ == "__main__":
    # `python finfeat_dag.py [--conf JSON] YYYY-MM-DD [...]`: one run per logical date, in order, in
    # Airflow's test mode (no scheduler), with the run conf as params; exit 1 unless every run succeeds.
    # The file must sit in the DAGs folder.
    argv = sys.argv[1:]
    conf = None
    if argv[:1] == ["--conf"]:
        conf, argv = json.loads(argv[1]), argv[2:]
    states = []
    for arg in argv or [pendulum.now("UTC").to_date_string()]:
        run = dag.test(logical_date=pendulum.parse(arg, tz="UTC"), run_conf=conf)
        states.append(run.state)
        print(json.dumps({"finfeat_dag_test": arg, "state": str(run.state)}), flush=True)
    sys.exit(0 if all(s == "success" for s in states) else 1)
