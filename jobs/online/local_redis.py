"""A throwaway ``redis-server`` on 127.0.0.1, for tests, benchmarks and trying the Redis store.

    python -m finfeat.jobs.online.local_redis [--port 6379]   # in the foreground until Ctrl-C

:func:`running_redis` is a context manager: it starts ``redis-server`` (from the PATH, e.g.
``apt-get install -y redis-server``) without persistence on a free port, waits until it
answers PING, and stops it on exit (also when it was paused with SIGSTOP).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class RedisServerMissing(RuntimeError):
    """``redis-server`` is not on the PATH."""


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerMissing("redis-server is not on PATH (install it: apt-get install -y redis-server)")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    proc: subprocess.Popen
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running_redis(workdir: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A throwaway redis-server on 127.0.0.1 (no persistence, logs in ``workdir``), stopped on exit."""
    binary = redis_server_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    for _ in range(1 if port else 5):  # a free port can be taken between choosing and binding it
        chosen = port or free_port()
        log = open(workdir / f"redis-{chosen}.log", "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen([binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None and not _ping(chosen):
            time.sleep(0.02)
        if proc.poll() is None and _ping(chosen):
            server = RedisServer(proc, chosen, workdir)
            break
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    if server is None:
        raise RuntimeError(f"could not start redis-server on 127.0.0.1; see the logs in {workdir}")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            try:
                os.kill(server.proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            except ProcessLookupError:
                pass
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a throwaway redis-server on 127.0.0.1 (Ctrl-C stops it)")
    parser.add_argument("--port", type=int, default=6379)
    args = parser.parse_args(argv)
    try:
        with running_redis(Path(tempfile.mkdtemp(prefix="finfeat-redis-")), port=args.port) as server:
            print(f"redis-server on {server.url} (no persistence); Ctrl-C stops it", flush=True)
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
    except (RedisServerMissing, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
