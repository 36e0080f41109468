"""``finfeat stream --engine flink``: hand the stream job to the Flink virtualenv.

The main virtualenv has no PyFlink (its pins clash with the project's Beam and pyarrow), so the
job runs as a child process of the Flink venv's python: on an embedded mini cluster without a
master, or submitted with Flink's own ``flink run`` to ``--flink-master``. Importable without
PyFlink.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from finfeat.jobs.flink import env as flink_env
from finfeat.jobs.flink.env import FlinkUnavailable

_JOB = Path(__file__).with_name("stream_job.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The Flink flags of ``finfeat stream`` (used with ``--engine flink``)."""
    g = p.add_argument_group("Flink (--engine flink; `make flink` installs the Flink environment)")
    g.add_argument("--flink-master", metavar="HOST:PORT",
                   help="submit to this Flink cluster's REST address (default: an embedded mini cluster)")
    g.add_argument("--parallelism", type=int, default=1, help="parallelism of every step (default 1)")
    g.add_argument("--checkpoint-dir", help="where checkpoints go (default WAREHOUSE/_flink_checkpoints)")
    g.add_argument("--checkpoint-interval-ms", type=int, default=5000,
                   help="milliseconds between checkpoints (Kafka offsets and the windows' state)")
    g.add_argument("--state-backend", choices=["hashmap", "rocksdb"], default="hashmap",
                   help="where keyed state lives between checkpoints: on the heap, or in RocksDB on disk")
    g.add_argument("--from-checkpoint", metavar="PATH", help="resume from a retained checkpoint or a savepoint")


def command(args: argparse.Namespace) -> list[str]:
    """The command that runs the job: the venv's python (mini cluster) or ``flink run``."""
    python = flink_env.require()
    if args.parallelism < 1:
        raise ValueError("--parallelism must be at least 1")
    checkpoints = args.checkpoint_dir or str(Path(args.warehouse) / "_flink_checkpoints")
    job_args = ["--bootstrap", args.bootstrap, "--topic", args.topic, "--warehouse", str(Path(args.warehouse).resolve()),
                "--app-id", args.app_id, "--bound-seconds", str(args.bound_seconds),
                "--commit-every-seconds", str(args.commit_every_seconds), "--emit-every-ms", str(args.emit_every_ms),
                "--buckets", str(args.buckets), "--parallelism", str(args.parallelism),
                "--batch-wait-ms", str(args.batch_wait_ms), "--store-retry-seconds", str(args.store_retry_seconds),
                "--checkpoint-dir", str(Path(checkpoints).resolve()),
                "--checkpoint-interval-ms", str(args.checkpoint_interval_ms), "--state-backend", args.state_backend]
    for flag, value in (("--stop-after-idle", args.stop_after_idle), ("--online-store", args.online_store),
                        ("--feature-spec", args.feature_spec), ("--from-checkpoint", args.from_checkpoint)):
        if value is not None:
            job_args += [flag, str(value)]
    if not args.flink_master:
        return [str(python), "-m", "finfeat.jobs.flink.stream_job", *job_args]
    flink = flink_env.flink_home() / "bin" / "flink"
    return ["bash", str(flink), "run", "-m", args.flink_master, "-pyexec", str(python), "-pyclientexec", str(python),
            "-py", str(_JOB), *job_args]


def run(args: argparse.Namespace, rest: list[str], token_key: bytes) -> int:
    if rest:
        print(f"finfeat stream: error: {' '.join(rest)}: Beam flags do not apply with --engine flink", file=sys.stderr)
        return 2
    try:
        cmd = command(args)
    except (FlinkUnavailable, ValueError) as exc:
        print(f"finfeat stream: error: {exc}", file=sys.stderr)
        return 2
    from finfeat.jobs import delta

    delta.check_warehouse(args.warehouse)  # outputs before any input is read, as for Beam
    env = {**os.environ, "FINFEAT_TOKEN_KEY": token_key.decode(), "FINFEAT_FLINK_OWNER": str(os.getpid())}
    if args.flink_master:  # `flink run` reads its client configuration from here
        env.setdefault("FLINK_CONF_DIR", str(flink_env.flink_home() / "conf"))
    # the job's driver (the Python program that submitted the job; under `flink run`, a child of
    # Flink's client, whose JVM serves it) in a session of its own, so that a Ctrl-C in a terminal
    # reaches neither JVM; SIGINT and SIGTERM are passed to the driver alone, which stops the job
    # with a savepoint (it also stops when this process is gone)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame) -> None:  # noqa: ANN001
        for pid in _drivers(proc.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _drivers(root: int) -> list[int]:
    """The processes under ``root`` (itself included) that run the job's Python driver; ``root``
    when none does yet (``flink run`` still starting: it then ends without a job)."""
    from finfeat.jobs.flink.cluster import _descendants

    found = []
    for pid in [root, *_descendants(root)]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"python" in Path(argv[0].decode(errors="replace")).name.encode() and any(
                a.endswith((b"stream_job.py", b"finfeat.jobs.flink.stream_job")) for a in argv):
            found.append(pid)
    return found or [root]
