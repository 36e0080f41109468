"""The feature engine's oracle tests and the stream step's tests, run again in the Flink
virtualenv: PyFlink pins other versions of pyarrow, numpy and pandas, and the Flink job calls the
same engine and steps there."""
from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO
from tests.test_stream_flink import require_flink_stack


def test_engine_oracle_tests_pass_in_the_flink_venv() -> None:
    from finfeat.jobs.flink import env as flink_env

    require_flink_stack()
    versions = subprocess.run([str(flink_env.python()), "-c", "import pyarrow, numpy; print(pyarrow.__version__, "
                               "numpy.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    proc = subprocess.run([str(flink_env.python()), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_features_oracle.py", "tests/test_oracle.py", "tests/test_stream_steps.py",
                           "tests/test_engine_small_frames.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, f"oracle tests failed with pyarrow {versions[0]}, numpy {versions[1]}:\n" \
                                 f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
