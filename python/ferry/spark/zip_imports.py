"""Keeps a reused PySpark Python worker from re-reading Spark's own zip archives at every task.

A PySpark worker imports pyspark and py4j from ``$SPARK_HOME/python/lib/*.zip`` (and has
Spark's spark-core jar on its path) and, at the start of every task, calls
``importlib.invalidate_caches()``. On Python 3.11 each zipimporter (one per package imported
from an archive: pyspark, pyspark.sql, pyspark.sql.pandas, ...) then reads its archive's whole
directory again, in pure Python: 0.1-0.3 s per task on an idle core, more than a small task's
own work. Those archives do not change while
Spark runs, so their importers here keep the directory they read first.
"""
from __future__ import annotations

import os
import sys
import zipimport


class _SparkZipImporter(zipimport.zipimporter):
    """A zipimporter of an archive that does not change: invalidate_caches keeps its directory."""

    def invalidate_caches(self):
        pass


def is_spark_archive(archive: str) -> bool:
    """pyspark.zip, py4j's zip, or a jar (Spark puts its spark-core jar on a worker's path too)."""
    name = os.path.basename(archive)
    return name == "pyspark.zip" or (name.startswith("py4j-") and name.endswith(".zip")) or name.endswith(".jar")


def keep_spark_zip_directories() -> int:
    """Swaps the importers of Spark's own zip archives for ones that keep their directory;
    returns how many it swapped. Cheap enough to call at the start of every task."""
    swapped = 0
    for path, finder in list(sys.path_importer_cache.items()):
        if type(finder) is zipimport.zipimporter and is_spark_archive(finder.archive):
            sys.path_importer_cache[path] = _SparkZipImporter(path)
            swapped += 1
    return swapped
