"""finfeat: point-in-time ML features for card fraud and credit risk on Apache Beam."""
__version__ = "0.1.0"

# Nothing heavy here: ``finfeat --help`` imports this package. The Arrow IPC pickler
# (finfeat.schemas.arrow_pickle) is registered by finfeat.pipelines, which every Beam job imports.


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import finfeat` stays light
    if name == "get_historical_features":
        from finfeat.jobs.historical import get_historical_features

        return get_historical_features
    raise AttributeError(f"module 'finfeat' has no attribute {name!r}")
