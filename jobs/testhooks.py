"""Fault-injection points for the crash and concurrency tests; inert unless a test sets the variables.

``FINFEAT_TEST_KILL_AT=<point>`` makes the process SIGKILL itself when the backfill reaches that
point (``started``, ``before:commit``, ``after:features``, ``after:dead_letters``, ...; the labels
consumer's ``labels:before-commit:N``: batch N written, its offsets not committed): a kill -9 at
an exact commit boundary, without a debugger or a timing guess. ``FINFEAT_TEST_COMMIT_BARRIER=<file>``
makes the committer announce itself (``<file>.<pid>.ready``) and wait until ``<file>`` exists, so
that a test can release several processes into their first commit at the same instant.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_AT_ENV = "FINFEAT_TEST_KILL_AT"
BARRIER_ENV = "FINFEAT_TEST_COMMIT_BARRIER"
_BARRIER_TIMEOUT_S = 600.0


def reached(point: str) -> None:
    """Kill this process with SIGKILL if a test asked for it at ``point``."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def commit_barrier() -> None:
    """Wait for a test's start signal before the first commit, if a test set one."""
    start = os.environ.get(BARRIER_ENV)
    if not start:
        return
    Path(f"{start}.{os.getpid()}.ready").touch()
    deadline = time.monotonic() + _BARRIER_TIMEOUT_S
    while not Path(start).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{BARRIER_ENV}: {start} did not appear within {_BARRIER_TIMEOUT_S:.0f} s")
        time.sleep(0.01)
