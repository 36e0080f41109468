"""finfeat: point-in-time ML features for card fraud and credit risk on Apache Beam."""
__version__ = "0.1.0"

from finfeat.schemas import arrow_pickle as _arrow_pickle  # noqa: E402,F401  (registers the IPC pickler)


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import finfeat` stays light
    if name == "get_historical_features":
        from finfeat.jobs.historical import get_historical_features

        return get_historical_features
    raise AttributeError(f"module 'finfeat' has no attribute {name!r}")
