"""A local standalone Flink cluster (one JobManager, TaskManagers) on 127.0.0.1, from the Flink
distribution inside PyFlink. Importable without PyFlink: it only runs Flink's own scripts.

    python -m finfeat.jobs.flink.cluster start --dir .flink/cluster --rest-port 8081   # make flink-cluster
    python -m finfeat.jobs.flink.cluster stop --dir .flink/cluster                     # make flink-cluster-stop

Tests use :class:`LocalFlinkCluster` as a context manager: every port free (other processes on
the machine run clusters too), a configuration folder of its own (``FLINK_CONF_DIR``) with
``python.executable`` set to the Flink venv's python, logs and pid files in its folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from finfeat.jobs.flink import env as flink_env
from finfeat.jobs.flink.env import FlinkUnavailable

_LOG = logging.getLogger(__name__)
_IDENT = "finfeat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(config: dict, dotted: str, value: object) -> None:
    node = config
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def write_conf(conf_dir: Path, *, rest_port: int, rpc_port: int, slots: int, python: Path,
               taskmanager_memory: str = "1728m", extra: dict[str, object] | None = None) -> Path:
    """``config.yaml`` (Flink's defaults, every address on 127.0.0.1) and the log4j files."""
    home = flink_env.flink_home()
    conf_dir.mkdir(parents=True, exist_ok=True)
    for name in ("log4j.properties", "log4j-cli.properties", "log4j-console.properties", "log4j-session.properties"):
        shutil.copy(home / "conf" / name, conf_dir / name)
    (conf_dir / "masters").write_text(f"127.0.0.1:{rest_port}\n")
    (conf_dir / "workers").write_text("127.0.0.1\n")
    config = yaml.safe_load((home / "conf" / "config.yaml").read_text()) or {}
    settings: dict[str, object] = {
        "jobmanager.rpc.address": "127.0.0.1", "jobmanager.rpc.port": rpc_port, "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.memory.process.size": "1024m",
        "taskmanager.bind-host": "127.0.0.1", "taskmanager.host": "127.0.0.1", "taskmanager.rpc.port": "0",
        "taskmanager.data.port": 0, "taskmanager.numberOfTaskSlots": slots,
        "taskmanager.memory.process.size": taskmanager_memory,
        "rest.address": "127.0.0.1", "rest.bind-address": "127.0.0.1", "rest.port": rest_port,
        "blob.server.port": "0",
        # a killed TaskManager is noticed within seconds, not the default 50 s
        "heartbeat.interval": 2000, "heartbeat.timeout": 10000,
        "python.executable": str(python), "python.client.executable": str(python),
        **(extra or {}),
    }
    for key, value in settings.items():
        _set(config, key, value)
    path = conf_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def link_lib(lib_dir: Path) -> Path:
    """The cluster's class path: Flink's ``lib`` plus ``opt/flink-python`` (Python operators run in
    the JobManager and TaskManagers; the distribution keeps that jar out of ``lib``), as links."""
    home = flink_env.flink_home()
    lib_dir.mkdir(parents=True, exist_ok=True)
    for jar in [*(home / "lib").glob("*.jar"), *(home / "opt").glob("flink-python-*.jar")]:
        link = lib_dir / jar.name
        if not link.exists():
            link.symlink_to(jar)
    return lib_dir


class LocalFlinkCluster:
    """``with LocalFlinkCluster() as c: c.master`` -> "127.0.0.1:PORT" (the REST address)."""

    def __init__(self, *, workdir: Path | None = None, rest_port: int | None = None, slots: int = 2,
                 start_timeout_s: float = 180) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finfeat-flink-"))
        self.rest_port = rest_port or free_port()
        self.slots, self._timeout = slots, start_timeout_s
        self.conf_dir, self.log_dir, self.pid_dir = (self.workdir / "conf", self.workdir / "log",
                                                     self.workdir / "pid")
        self.lib_dir = self.workdir / "lib"

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    @property
    def rest(self) -> str:
        return f"http://{self.master}"

    def env(self) -> dict[str, str]:
        """The environment of Flink's scripts (and of ``flink run``) for this cluster."""
        python = flink_env.python()
        return {**os.environ, "FLINK_CONF_DIR": str(self.conf_dir), "FLINK_LOG_DIR": str(self.log_dir),
                "FLINK_PID_DIR": str(self.pid_dir), "FLINK_IDENT_STRING": _IDENT, "FLINK_LIB_DIR": str(self.lib_dir),
                "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _script(self, name: str, *args: str) -> None:
        script = flink_env.flink_home() / "bin" / name
        subprocess.run(["bash", str(script), *args], env=self.env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT)

    def start(self) -> LocalFlinkCluster:
        flink_env.require()
        for d in (self.log_dir, self.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        link_lib(self.lib_dir)
        write_conf(self.conf_dir, rest_port=self.rest_port, rpc_port=free_port(), slots=self.slots,
                   python=flink_env.python())
        _LOG.info("starting a Flink cluster at %s (folder %s)", self.rest, self.workdir)
        self._script("jobmanager.sh", "start")
        self.start_taskmanager()
        return self

    def start_taskmanager(self) -> None:
        """One more TaskManager; returns once the JobManager lists at least one."""
        self._script("taskmanager.sh", "start")
        self.wait_for_taskmanagers(1)

    def wait_for_taskmanagers(self, n: int) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if len(self.get("/taskmanagers").get("taskmanagers", [])) >= n:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise FlinkUnavailable(f"the Flink cluster at {self.rest} listed no TaskManager within "
                                       f"{self._timeout:.0f} s; its logs are in {self.log_dir}:\n{self.log_tail()}")
            time.sleep(0.5)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.rest + path, timeout=10) as resp:
            return json.loads(resp.read())

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.rest + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else {}

    def _pids(self, daemon: str) -> list[int]:
        path = self.pid_dir / f"flink-{_IDENT}-{daemon}.pid"
        pids = [int(x) for x in path.read_text().split()] if path.exists() else []
        return [p for p in pids if _alive(p)]

    def taskmanager_pids(self) -> list[int]:
        return self._pids("taskexecutor")

    def jobmanager_pids(self) -> list[int]:
        return self._pids("standalonesession")

    def kill_taskmanager(self) -> int:
        """SIGKILL the newest TaskManager and its Python workers, as a crash of its machine would; its pid."""
        pids = self.taskmanager_pids()
        if not pids:
            raise FlinkUnavailable("no TaskManager process to kill")
        doomed = [pids[-1], *_descendants(pids[-1])]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(doomed, 30)
        return pids[-1]

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        pids = self.taskmanager_pids() + self.jobmanager_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not _wait_gone(pids, 30):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_gone(pids, 10)
        for f in self.pid_dir.glob("*.pid"):
            f.unlink()

    def __enter__(self) -> LocalFlinkCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is gone for every purpose here
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finfeat.jobs.flink.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=flink_env.REPO / ".flink" / "cluster",
                        help="configuration, logs and pid files of the cluster")
    parser.add_argument("--rest-port", type=int, default=8081, help="REST API and web UI port (default 8081)")
    parser.add_argument("--slots", type=int, default=2, help="task slots of the TaskManager (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster = LocalFlinkCluster(workdir=args.dir, rest_port=args.rest_port, slots=args.slots)
    try:
        if args.action == "stop":
            cluster.stop()
            print(f"Flink cluster in {args.dir} stopped")
            return 0
        if cluster.jobmanager_pids():
            print(f"a Flink cluster already runs from {args.dir} (make flink-cluster-stop stops it)")
            return 0
        cluster.start()
    except FlinkUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        cluster.stop()
        return 2
    print(f"Flink cluster up: web UI and REST at {cluster.rest}; submit with "
          f"`finfeat stream --engine flink --flink-master {cluster.master}`; logs in {cluster.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
