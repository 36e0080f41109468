"""Packaging for finfeat.

The repository keeps one top-level folder per concern (``schemas/``, ``transforms/``,
``pipelines/``, ``validation/``, ``jobs/``); they install as sub-packages of ``finfeat`` so
that nothing generic lands at the top of a user's ``site-packages``. The same file is what
Beam's ``--setup_file`` builds and ships to remote workers.
"""
from __future__ import annotations

from setuptools import setup

_SUBPACKAGES = ("schemas", "transforms", "pipelines", "validation", "jobs")
_JOB_PACKAGES = ("online", "kafka", "spark", "flink")

setup(
    name="finfeat",
    version="0.1.0",
    description="Point-in-time ML features for card fraud and credit risk, batch and streaming on Apache Beam",
    python_requires=">=3.11,<3.12",
    packages=["finfeat", *(f"finfeat.{name}" for name in _SUBPACKAGES), *(f"finfeat.jobs.{n}" for n in _JOB_PACKAGES)],
    package_dir={"finfeat": "finfeat", **{f"finfeat.{name}": name for name in _SUBPACKAGES},
                 **{f"finfeat.jobs.{n}": f"jobs/{n}" for n in _JOB_PACKAGES}},
    package_data={"finfeat.jobs": ["mappings/*.yaml", "airflow/*.py"], "finfeat.jobs.flink": ["pom.xml"],
                  "finfeat.validation": ["suites/*.yaml", "docs_site/*.j2", "docs_site/*.css"]},
    install_requires=[
        "apache-beam>=2.77,<2.78",
        "deltalake>=1.6,<1.7",
        "pyarrow>=25,<26",
        "numpy>=2,<3",
        "pandas>=2.3,<2.4",
        "pyyaml>=6",
        "pydantic>=2.10,<3",
        "tqdm>=4.66",
        "great-expectations>=1.24,<1.25",
        # retries with backoff for Delta commits that lose a race to a concurrent backfill
        "tenacity>=9.1,<10",
    ],
    extras_require={
        # hiredis: redis-py's C parser and command packer (twice the write rate, faster reads)
        "online": ["redis==8.1.0", "hiredis==3.5.0"],
        # finfeat training-set --engine spark, finfeat maintain --engine spark; the Delta jars come from
        # `bash jobs/spark/fetch_jars.sh` (Maven), never from Ivy at run time.
        "spark": ["pyspark==4.2.0", "delta-spark==4.4.1"],
        # finfeat train / score (training-set's local engine needs duckdb too).
        "train": ["xgboost-cpu>=3,<4", "scikit-learn>=1.9,<2", "matplotlib>=3.11,<4", "duckdb>=1.1"],
        # finfeat produce / stream (the Kafka client; the broker's jars come from Maven)
        "stream": ["confluent-kafka==2.16.1"],
        # finfeat serve: the HTTP feature service (ASGI app on uvicorn, Prometheus metrics)
        "serve": ["starlette==1.10.0", "uvicorn==0.54.0", "prometheus-client==0.26.0"],
        "dev": ["pytest>=8", "hypothesis>=6", "duckdb>=1.1", "redis==8.1.0", "hiredis==3.5.0"],
    },
    entry_points={"console_scripts": ["finfeat = finfeat.jobs.cli:entry"]},
)
