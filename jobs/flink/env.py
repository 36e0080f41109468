"""Where the Flink environment lives: its virtualenv, the Flink distribution inside PyFlink, the
Kafka connector jar. Importable without PyFlink (the main venv uses it to hand a job over).

``make flink`` builds all three: ``.venv-flink`` (PyFlink and the few packages the shared code
needs, pinned in ``constraints-flink.txt``, finfeat installed ``--no-deps``) and the connector
jar in ``.cache/flink/lib`` (Maven). ``FINFEAT_FLINK_VENV`` and ``FINFEAT_FLINK_LIB`` point
elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KAFKA_CONNECTOR = "flink-sql-connector-kafka-5.0.0-2.2.jar"
HOW_TO_INSTALL = "run `make flink` in the repository (a separate virtualenv with PyFlink, about 5 minutes)"


class FlinkUnavailable(RuntimeError):
    """The Flink environment is missing or a cluster did not come up; the message says what to do."""


def venv() -> Path:
    return Path(os.environ.get("FINFEAT_FLINK_VENV", REPO / ".venv-flink"))


def python() -> Path:
    """The Flink virtualenv's python: it runs the job's driver and every Python worker."""
    return venv() / "bin" / "python"


def flink_home() -> Path:
    """The Flink distribution shipped inside the PyFlink wheel."""
    found = sorted((venv() / "lib").glob("python3.*/site-packages/pyflink"))
    if not found:
        raise FlinkUnavailable(f"no PyFlink in {venv()}: {HOW_TO_INSTALL}")
    return found[0]


def connector_jar() -> Path:
    lib = Path(os.environ.get("FINFEAT_FLINK_LIB", REPO / ".cache" / "flink" / "lib"))
    jar = lib / KAFKA_CONNECTOR
    if not jar.exists():
        raise FlinkUnavailable(f"the Kafka connector jar {jar} is missing: {HOW_TO_INSTALL}")
    return jar


def require() -> Path:
    """The Flink venv's python, after checking that the environment is complete."""
    if not python().exists():
        raise FlinkUnavailable(f"no Flink environment at {venv()}: {HOW_TO_INSTALL}")
    flink_home()
    connector_jar()
    return python()
