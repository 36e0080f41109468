"""What to do next, added to errors a newcomer meets: the install that gives a missing library,
the built-in mapping an input file fits."""
from __future__ import annotations

from collections.abc import Sequence

#: Top-level module -> the extra of setup.py that installs it.
EXTRA_OF_MODULE = {
    "sklearn": "train", "xgboost": "train", "matplotlib": "train", "duckdb": "train",
    "confluent_kafka": "stream", "redis": "online", "hiredis": "online",
    "pyspark": "spark", "delta": "spark",
    "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve",
}


def install_hint(missing_module: str | None) -> str | None:
    """'pip install ...' advice for a missing library, or None when it is not an optional one."""
    extra = EXTRA_OF_MODULE.get((missing_module or "").split(".")[0])
    if extra is None:
        return None
    return (f"this command needs the [{extra}] extra, which is not installed: run `make setup-full` in the "
            f"repository (installs every extra into .venv) or `pip install -c constraints.txt -e '.[{extra}]'`")


def mapping_hint(inputs: Sequence[str], current: str | None) -> str:
    """'; pass --mapping NAME' when every input file has the columns of a built-in mapping."""
    from finfeat.jobs.sources import check_columns, expand_inputs
    from finfeat.schemas.mapping import BUILTIN_MAPPINGS, Mapping

    try:
        paths = expand_inputs(list(inputs))
    except Exception:  # noqa: BLE001 - no hint is better than a second error
        return ""
    for name in BUILTIN_MAPPINGS:
        if name == current:
            continue
        try:
            mapping = Mapping.load(name)
            for p in paths:
                check_columns(p, mapping)
        except Exception:  # noqa: BLE001 - this mapping does not fit
            continue
        return f"\nhint: the input has the columns of the built-in {name!r} mapping: pass --mapping {name}"
    return ""
