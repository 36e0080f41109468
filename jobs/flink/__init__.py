"""The Flink engine: the stream job on PyFlink, and a local standalone cluster to run it on.

Only :mod:`~finfeat.jobs.flink.env` and :mod:`~finfeat.jobs.flink.cluster` import without
PyFlink; the job modules run in the Flink virtualenv (``make flink``).
"""
