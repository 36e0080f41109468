"""The PySpark engine (optional: ``pip install -e ".[spark]"`` and ``bash jobs/spark/fetch_jars.sh``).

* :mod:`.session`: a local SparkSession with Delta Lake from the jars in ``.cache/jars/``
  (``spark.jars``, never ``spark.jars.packages``: nothing is downloaded when a session starts);
* :mod:`.training`: training sets with the same rule and output as
  :mod:`finfeat.jobs.training` (the local engine), reading the Delta tables delta-rs wrote.

Nothing here is imported by the default install; pyspark is imported lazily.
"""
