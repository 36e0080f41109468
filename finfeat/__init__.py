"""finfeat: point-in-time ML features for card fraud and credit risk on Apache Beam."""
__version__ = "0.1.0"

from finfeat.schemas import arrow_pickle as _arrow_pickle  # noqa: E402,F401  (registers the IPC pickler)
