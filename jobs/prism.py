"""Prism, Beam's local portable runner, started by the job in its own process group.

Beam's PrismRunner starts Prism in the job's process group, so a Ctrl-C in a terminal (or a
SIGTERM to the group) reaches Prism too, which then ends the job before it can drain. Started
here in a session of its own, Prism sees only what the job tells it; it is told to die with the
job's process (Linux ``PR_SET_PDEATHSIG``), so a killed job leaves no Prism behind.
"""
from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

_LOG = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the job stops Prism itself at its end
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrismProcess:
    """``with PrismProcess(path) as endpoint:`` a Prism job server on 127.0.0.1 for one job."""

    def __init__(self, path: str | Path, *, start_timeout_s: float = 60.0) -> None:
        self._path, self._timeout = str(path), start_timeout_s
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        port = _free_port()
        self._proc = subprocess.Popen(
            [self._path, "--job_port", str(port), "--serve_http=false", "--log_level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self._timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Prism ({self._path}) exited with {self._proc.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"Prism ({self._path}) did not listen on port {port} "
                                       f"within {self._timeout:.0f} s") from None
                time.sleep(0.1)
        _LOG.info("Prism %s listening on 127.0.0.1:%d", self._path, port)
        return f"localhost:{port}"

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
