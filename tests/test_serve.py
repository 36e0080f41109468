"""`finfeat serve`: a real uvicorn process on a free loopback port, a real HTTP client, SQLite and
Redis stores; answers equal the CLI's (`serve-lookup`, `score --json --store`), errors are typed JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from finfeat.jobs.cli import main  # noqa: E402
from finfeat.jobs.online import materialize, open_store  # noqa: E402
from finfeat.jobs.online.local_redis import free_port  # noqa: E402
from finfeat.transforms.spec import FeatureSpec  # noqa: E402
from tests.online_fixtures import redis_server, running_redis, sparkov_test_events  # noqa: E402,F401
from tests.training_fixtures import sparkov_warehouse  # noqa: E402,F401

TOKEN_ENV = "FINFEAT_TEST_SERVE_TOKEN"
TOKEN = "t0ken-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port

    def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
                ctype = resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, text, ctype = exc.code, exc.read().decode(), exc.headers.get("content-type", "")
        return status, (json.loads(text) if "json" in ctype else text)


@contextmanager
def serving(*args: str, token: bool = True) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "finfeat.jobs.cli", "serve", "--port", str(port), *args]
    if token:
        cmd += ["--token-env", TOKEN_ENV]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"finfeat serve exited {proc.returncode}: {proc.stdout.read()}")
            try:
                if server.call("GET", "/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("finfeat serve did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def _requests(events: pa.Table, n: int) -> list[dict[str, Any]]:
    """Candidates at the times of stored events (some with their own txn id, some without)."""
    rows = events.take(list(range(7, events.num_rows, events.num_rows // n))[:n]).to_pylist()
    out = []
    for i, r in enumerate(rows):
        req = {"card_token": r["card_token"], "merchant_id": r["merchant_id"], "amount_minor": r["amount_minor"] + i,
               "at": r["event_time"].isoformat()}
        if i % 2:
            req["txn_id"] = r["txn_id"]
        if r["merchant_lat"] is not None and i % 3:
            req["merchant_lat"], req["merchant_lon"] = r["merchant_lat"], r["merchant_lon"]
        out.append(req)
    return out


def _lookup_argv(store: str, req: dict[str, Any], *extra: str) -> list[str]:
    argv = ["serve-lookup", "--store", store, "--card-token", req["card_token"], "--merchant-id", req["merchant_id"],
            "--amount-minor", str(req["amount_minor"]), "--at", req["at"], *extra]
    if "txn_id" in req:
        argv += ["--txn-id", req["txn_id"]]
    if "merchant_lat" in req:
        argv += ["--lat", repr(req["merchant_lat"]), "--lon", repr(req["merchant_lon"])]
    return argv


@pytest.fixture(scope="module")
def sqlite_url(sparkov_test_events: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:{tmp_path_factory.mktemp('serve') / 'online.db'}"
    spec = FeatureSpec.default()
    with open_store(url, spec) as store:
        materialize(store, sparkov_test_events, spec)
    return url


@pytest.fixture(scope="module")
def redis_url(sparkov_test_events: pa.Table, redis_server) -> str:  # noqa: ANN001,F811
    spec = FeatureSpec.default()
    with open_store(redis_server.url, spec, namespace="ffserve") as store:
        materialize(store, sparkov_test_events, spec)
    return redis_server.url


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_features_equal_the_cli_lookup(backend: str, request: pytest.FixtureRequest, sparkov_test_events: pa.Table,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    ns = ["--namespace", "ffserve"] if backend == "redis" else []
    reqs = _requests(sparkov_test_events, 12)
    with serving("--store", url, *ns) as srv:
        singles = []
        for req in reqs:
            status, got = srv.call("POST", "/features", req, headers=AUTH)
            assert status == 200, got
            code, cli = _cli_json(capsys, *_lookup_argv(url, req, *ns))
            assert code == 0
            assert got == cli
            singles.append(got)
        status, batch = srv.call("POST", "/features", reqs, headers=AUTH)
        assert status == 200 and batch == singles
        # a candidate long after the card's newest event: the same row, marked stale (the CLI exits 6)
        late = {**reqs[0], "at": "2026-11-30T00:00:00Z"}
        status, got = srv.call("POST", "/features", late, headers=AUTH)
        code, cli = _cli_json(capsys, *_lookup_argv(url, late, *ns))
        assert status == 200 and code == 6 and got == cli
        assert got["stale"] is True and got["max_age_s"] == 30 * 86_400 and got["age_s"] > 30 * 86_400
        assert not any(s["stale"] for s in singles)
        # typed errors
        unknown = {**reqs[0], "card_token": "tok_never_seen"}
        status, body = srv.call("POST", "/features", unknown, headers=AUTH)
        assert status == 404 and body["error"] == "not_found" and body["entity"] == "card"
        assert _cli_json(capsys, *_lookup_argv(url, unknown, *ns))[0] == 3
        status, body = srv.call("POST", "/features", [reqs[0], unknown], headers=AUTH)
        assert status == 200 and body[0] == singles[0] and body[1]["status"] == 404
        for bad, field in [({k: v for k, v in reqs[0].items() if k != "merchant_id"}, "merchant_id"),
                           ({**reqs[0], "amount_minor": 12.5}, "amount_minor"),
                           ({**reqs[0], "amount_minor": -1}, "amount_minor"),
                           ({**reqs[0], "at": "yesterday"}, "at"),
                           ({**reqs[0], "colour": "red"}, "colour")]:
            status, body = srv.call("POST", "/features", bad, headers=AUTH)
            assert status == 400 and body["error"] == "bad_request" and body["field"] == field, body
        status, body = srv.call("POST", "/features", [reqs[0], {"card_token": "x"}], headers=AUTH)
        assert status == 400 and body["field"].startswith("1.")
        status, body = srv.call("POST", "/features", raw=b"{not json", headers=AUTH)
        assert status == 400 and body["error"] == "bad_request"
        assert srv.call("POST", "/features", reqs[0])[0] == 401
        status, body = srv.call("POST", "/features", reqs[0], headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"] == "unauthorized"
        assert srv.call("GET", "/metrics")[0] == 401
        status, body = srv.call("POST", "/score", reqs[0], headers=AUTH)
        assert status == 404 and body["error"] == "no_model"
        assert srv.call("GET", "/nowhere", headers=AUTH)[1]["error"] == "no_route"
        status, ready = srv.call("GET", "/readyz")
        assert status == 200 and ready["status"] == "ready"
        status, metrics = srv.call("GET", "/metrics", headers=AUTH)
        assert status == 200
        assert f'finfeat_http_requests_total{{route="/features",status="200"}} {len(reqs) + 3}.0' in metrics
        assert 'finfeat_http_requests_total{route="/features",status="400"} 7.0' in metrics
        assert 'finfeat_http_requests_total{route="/features",status="401"} 2.0' in metrics
        assert 'finfeat_http_request_duration_seconds_bucket{le="+Inf",route="/features"}' in metrics


def test_store_down_is_503_and_counted(sparkov_test_events: pa.Table, tmp_path: Path) -> None:
    spec = FeatureSpec.default()
    req = _requests(sparkov_test_events, 1)[0]
    with running_redis(tmp_path) as redis:
        with open_store(redis.url, spec) as store:
            materialize(store, sparkov_test_events, spec)
        with serving("--store", redis.url, token=False) as srv:
            assert srv.call("POST", "/features", req)[0] == 200
            redis.kill()
            status, body = srv.call("POST", "/features", req)
            assert status == 503 and body["error"] == "store_unavailable"
            status, body = srv.call("GET", "/readyz")
            assert status == 503 and body["error"] == "store_unavailable"
            assert srv.call("GET", "/healthz")[0] == 200
            metrics = srv.call("GET", "/metrics")[1]
            assert 'finfeat_store_errors_total{kind="store_unavailable"} 2.0' in metrics


def test_several_workers_answer_alike(sqlite_url: str, sparkov_test_events: pa.Table) -> None:
    reqs = _requests(sparkov_test_events, 4)
    with serving("--store", sqlite_url) as one, serving("--store", sqlite_url, "--workers", "2") as two:
        for req in reqs:
            a, b = one.call("POST", "/features", req, headers=AUTH), two.call("POST", "/features", req, headers=AUTH)
            assert a[0] == b[0] == 200 and a[1] == b[1]


def test_bad_start_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                              ) -> None:
    assert main(["serve", "--store", f"sqlite:{tmp_path / 'none.db'}"]) == 4
    assert "unavailable" in capsys.readouterr().err
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--store", "sqlite:x.db", "--token-env", TOKEN_ENV]) == 2
    assert f"export {TOKEN_ENV}" in capsys.readouterr().err
    assert main(["serve", "--store", "sqlite:x.db", "--host", "0.0.0.0"]) == 2
    assert "--token-env" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(sparkov_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    from datetime import date

    from finfeat.jobs.train import TrainConfig, train

    out = tmp_path_factory.mktemp("serve_model") / "m"
    train(TrainConfig(warehouse=str(sparkov_warehouse), n_estimators=20, threads=1, train_start=date(2019, 1, 1),
                      train_end=date(2019, 1, 15), test_start=date(2020, 6, 21), test_end=date(2020, 6, 22)), out)
    assert "Gap between the periods: 522 day(s)" in (out / "report.md").read_text()
    return out


def test_score_equals_the_cli(model_dir: Path, sqlite_url: str, sparkov_test_events: pa.Table,
                              capsys: pytest.CaptureFixture[str]) -> None:
    reqs = _requests(sparkov_test_events, 6)
    with serving("--store", sqlite_url, "--model", str(model_dir)) as srv:
        singles = []
        for req in reqs:
            status, got = srv.call("POST", "/score", req, headers=AUTH)
            assert status == 200, got
            code, cli = _cli_json(capsys, "score", "--model", str(model_dir), "--json", json.dumps(req),
                                  "--store", sqlite_url)
            assert code == 0 and got == cli
            assert 0.0 <= got["score"] <= 1.0
            singles.append(got)
        status, batch = srv.call("POST", "/score", reqs, headers=AUTH)
        assert status == 200 and batch == singles
        status, body = srv.call("POST", "/score", {**reqs[0], "card_token": "tok_never_seen"}, headers=AUTH)
        assert status == 404 and body["error"] == "not_found"
        status, ready = srv.call("GET", "/readyz")
        assert ready["model_id"] == batch[0]["model_id"]
