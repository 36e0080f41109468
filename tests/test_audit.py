"""The audit trail: hash chain (tampering detected), crash safety (kill -9 of the writer), disk full
(a mock: the one fault this machine cannot cause), and every online decision on the record
(score --json/--jsonl with a store, serve /score)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from finfeat.jobs import audit as audit_cli
from finfeat.jobs import score as score_cli
from finfeat.jobs.audit import AuditTrail, AuditUnavailable, find, verify
from finfeat.jobs.online import materialize, open_store
from finfeat.transforms.spec import FeatureSpec
from tests.online_fixtures import sparkov_test_events  # noqa: F401  (fixture)
from tests.test_models import model_dir  # noqa: F401  (fixture)
from tests.training_fixtures import sparkov_warehouse  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _cli(module, argv: list[str]) -> int:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="finfeat")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return module.run(parser.parse_args(argv))


def _decision(i: int) -> dict:
    return {"request_id": f"req-{i}", "txn_id": f"t{i}", "score": i / 100, "features": {"a": i, "b": None},
            "reasons": [{"feature": "a", "value": float(i), "contribution": 0.1 * i}]}


def _fill(folder: Path, n: int, **kw) -> None:  # noqa: ANN003
    with AuditTrail.open(folder, caller="test", **kw) as trail:
        for i in range(n):
            trail.record(_decision(i))


def _lines(folder: Path) -> tuple[Path, list[bytes]]:
    seg = sorted((folder / "w0").glob("seg-*.jsonl"))[-1]
    return seg, seg.read_bytes().splitlines(keepends=True)


# ----------------------------------------------------------------------------------- the chain


def test_chain_verifies_and_continues_across_reopen_and_segments(tmp_path: Path) -> None:
    _fill(tmp_path, 30, segment_bytes=2000)
    _fill(tmp_path, 5, segment_bytes=2000)
    segs = sorted((tmp_path / "w0").glob("seg-*.jsonl"))
    assert len(segs) > 2
    assert all(s.stat().st_mode & 0o222 == 0 for s in segs[:-1])  # closed segments are read-only
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.streams == {"w0": 35}
    recs = [json.loads(x) for s in segs for x in s.read_bytes().splitlines()]
    assert [r["seq"] for r in recs] == list(range(1, 36))
    assert [r["request_id"] for r in recs] == [f"req-{i}" for i in range(30)] + [f"req-{i}" for i in range(5)]
    assert all(r["prev"] == p["hash"] for p, r in zip(recs, recs[1:]))
    assert json.loads((tmp_path / "w0" / "HEAD.json").read_text())["seq"] == 35
    assert [r["seq"] for r in find(tmp_path, request_id="req-3")] == [4, 34]
    assert find(tmp_path, txn_id="t29")[0]["score"] == 0.29


@pytest.mark.parametrize("tamper", ["alter", "remove", "reorder", "truncate_tail"])
def test_verify_detects_tampering(tamper: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fill(tmp_path, 8)
    assert _cli(audit_cli, ["audit", "verify", "--dir", str(tmp_path)]) == 0
    seg, lines = _lines(tmp_path)
    if tamper == "alter":
        rec = json.loads(lines[3])
        rec["score"] = 0.0001
        lines[3] = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
    elif tamper == "remove":
        del lines[4]
    elif tamper == "reorder":
        lines[2], lines[5] = lines[5], lines[2]
    else:
        lines = lines[:-2]
    seg.write_bytes(b"".join(lines))
    report = verify(tmp_path)
    assert not report.ok
    expected = {"alter": "hash mismatch", "remove": "seq 6 where 5", "reorder": "seq 6 where 3",
                "truncate_tail": "records removed from the end"}[tamper]
    assert any(expected in p for p in report.problems), report.problems
    capsys.readouterr()
    assert _cli(audit_cli, ["audit", "verify", "--dir", str(tmp_path)]) == 1
    assert expected in capsys.readouterr().out


def test_two_writers_get_two_streams(tmp_path: Path) -> None:
    with AuditTrail.open(tmp_path) as a, AuditTrail.open(tmp_path) as b:
        a.record(_decision(1))
        b.record(_decision(2))
        b.record(_decision(3))
    assert verify(tmp_path).streams == {"w0": 1, "w1": 2}


# ----------------------------------------------------------------------------------- losing the writer

_WRITER = textwrap.dedent("""
    import sys
    from finfeat.jobs.audit import AuditTrail
    trail = AuditTrail.open(sys.argv[1], caller="crash-test")
    i = 0
    while True:
        trail.record({"request_id": f"crash-{i}", "score": 0.5, "features": {"x": i}, "blob": "z" * 3000})
        print(f"crash-{i}", flush=True)   # the decision is returned only now
        i += 1
""")


def test_kill_9_loses_no_returned_decision(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    _fill(folder, 3)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    returned = []
    try:
        while len(returned) < 300:
            line = proc.stdout.readline()
            assert line, "the writer died"
            returned.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for line in proc.stdout:  # whatever it printed before dying was returned too
        returned.append(line.strip())
    # reopen (the restart): recovers any unfinished line, continues the chain
    _fill(folder, 2)
    report = verify(folder)
    assert report.ok, report.problems
    recorded = {r["request_id"] for r in find(folder, request_id="crash-0")}
    assert recorded == {"crash-0"}
    seg_text = b"".join(p.read_bytes() for p in sorted((folder / "w0").glob("seg-*.jsonl")))
    ids = [json.loads(x).get("request_id") for x in seg_text.splitlines()]
    assert set(returned) <= set(ids)          # every returned decision is on the record
    assert ids[:3] == ["req-0", "req-1", "req-2"] and ids[-2:] == ["req-0", "req-1"]


def test_disk_full_refuses_the_decision_and_recovers_the_torn_record(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "audit"
    trail = AuditTrail.open(folder)
    trail.record(_decision(0))
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:  # ENOSPC after part of the line is written
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("finfeat.jobs.audit.os.write", half_then_full)
    with pytest.raises(AuditUnavailable, match="No space left"):
        trail.record(_decision(1))
    monkeypatch.setattr("finfeat.jobs.audit.os.write", real_write)
    with pytest.raises(AuditUnavailable, match="failed earlier"):  # fails closed until reopened
        trail.record(_decision(2))
    trail.close()
    report = verify(folder)
    assert any("unfinished last record" in p for p in report.problems)
    _fill(folder, 1)  # reopen: the torn bytes become a torn_tail record, the chain goes on
    assert verify(folder).ok
    recs = [json.loads(x) for x in _lines(folder)[1]]
    assert [r["kind"] for r in recs] == ["decision", "torn_tail", "decision"]
    assert recs[1]["bytes"] > 0 and [r.get("request_id") for r in recs] == ["req-0", None, "req-0"]


def test_sync_mode_waits_for_the_fsync(tmp_path: Path) -> None:
    with AuditTrail.open(tmp_path, sync=True) as trail:
        stored = trail.record(_decision(0))
        assert trail.synced_seq >= stored["seq"]
        head = json.loads((tmp_path / "w0" / "HEAD.json").read_text())
        assert head["seq"] >= stored["seq"]


# ----------------------------------------------------------------------------------- online decisions


@pytest.fixture(scope="module")
def store_url(sparkov_test_events: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    url = f"sqlite:{tmp_path_factory.mktemp('audit_store') / 'online.db'}"
    spec = FeatureSpec.default()
    with open_store(url, spec) as store:
        materialize(store, sparkov_test_events, spec)
    return url


def test_score_jsonl_with_a_store_records_every_decision(model_dir: Path, store_url: str,  # noqa: F811
                                                         sparkov_test_events: pa.Table, tmp_path: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture) -> None:
    from tests.test_serve import _requests

    reqs = _requests(sparkov_test_events, 4)
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    folder = tmp_path / "audit"
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--jsonl", str(path), "--store", store_url,
                            "--allow-missing", "--audit", str(folder), "--caller", "analyst-7"]) == 0
    results = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(results) == 4 and len({r["request_id"] for r in results}) == 4
    assert verify(folder).ok
    for r in results:
        (rec,) = find(folder, request_id=r["request_id"])
        assert rec["caller"] == "analyst-7" and rec["score"] == r["score"] and rec["features"] == r["features"]
        assert rec["reasons"] == r["reasons"] and rec["as_of_us"] == r["as_of_us"]
        assert rec["model_id"] == r["model_id"] and rec["spec_hash"] == FeatureSpec.default().spec_hash
    with_txn = next(r for r in reqs if "txn_id" in r)
    assert _cli(audit_cli, ["audit", "show", "--dir", str(folder), "--txn-id", with_txn["txn_id"]]) == 0
    shown = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [s["card_token"] for s in shown] == [with_txn["card_token"]]
    assert _cli(audit_cli, ["audit", "show", "--dir", str(folder), "--request-id", "nope"]) == 3
    # the audit cannot be written: no decision
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("finfeat.jobs.audit.os.write", _enospc)
        capsys.readouterr()
        rc = _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(reqs[0]), "--store", store_url,
                              "--allow-missing", "--audit", str(folder)])
    out = capsys.readouterr().out
    assert rc == 4 and json.loads(out)["error"] == "audit_unavailable" and "\"score\"" not in out


def _enospc(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_serve_records_each_score_before_answering(model_dir: Path, store_url: str,  # noqa: F811
                                                   sparkov_test_events: pa.Table, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("uvicorn")
    import hashlib

    from tests.test_serve import AUTH, TOKEN, _requests, serving

    reqs = _requests(sparkov_test_events, 3)
    folder = tmp_path / "audit"
    with serving("--store", store_url, "--model", str(model_dir), "--allow-missing", "--audit", str(folder)) as srv:
        status, one = srv.call("POST", "/score", reqs[0], headers={**AUTH, "X-Request-ID": "abc-1"})
        assert status == 200 and one["request_id"] == "abc-1"
        status, many = srv.call("POST", "/score", reqs, headers=AUTH)
        assert status == 200 and len({m["request_id"] for m in many}) == 3
    assert verify(folder).ok
    (rec,) = find(folder, request_id="abc-1")
    assert rec["caller"] == "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12] + "@127.0.0.1"
    assert rec["score"] == one["score"] and rec["reasons"] == one["reasons"]
    assert all(find(folder, request_id=m["request_id"])[0]["score"] == m["score"] for m in many)
