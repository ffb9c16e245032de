"""ferry.spark.zip_imports: Spark's own zip archives are not re-read at every task, other zips are."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = r"""
import importlib, sys, zipfile, zipimport
from ferry.spark.zip_imports import keep_spark_zip_directories, is_spark_archive
spark_zip, other_zip = sys.argv[1], sys.argv[2]
sys.path[:0] = [spark_zip, other_zip]
import zpkg.a, opkg.a
swapped = keep_spark_zip_directories()
# What a new task would see if an archive changed: a module added to each.
for path, pkg in ((spark_zip, "zpkg"), (other_zip, "opkg")):
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{pkg}/b.py", "X = 2\n")
importlib.invalidate_caches()  # what a PySpark worker runs at the start of every task
def importable(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False
print(swapped, importable("zpkg.b"), importable("opkg.b"), is_spark_archive("/x/lib/py4j-0.10.9.9-src.zip"))
"""


def make_zip(path, pkg):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{pkg}/__init__.py", "")
        z.writestr(f"{pkg}/a.py", "X = 1\n")


def test_spark_zips_keep_their_directory_and_other_zips_are_reread(tmp_path):
    spark_zip, other_zip = tmp_path / "pyspark.zip", tmp_path / "deps.zip"
    make_zip(spark_zip, "zpkg")
    make_zip(other_zip, "opkg")
    res = subprocess.run([sys.executable, "-c", CODE, str(spark_zip), str(other_zip)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    assert res.returncode == 0, res.stderr
    # Two importers of pyspark.zip (the archive and its package zpkg) were swapped; the module added
    # to it stays unseen, while the user's zip is read again and its new module imports.
    assert res.stdout.split() == ["2", "False", "True", "True"]


TASKS = r"""
import inspect, sys, zipimport
sys.path.insert(0, sys.argv[1])
import zpkg.a
from ferry.spark import convolve_tasks, lopq_tasks, tiles_tasks
TASKS = [convolve_tasks.compute_rows, convolve_tasks.plan_partition, lopq_tasks.pass_partition,
         lopq_tasks.blocks_from_arrays, lopq_tasks.blocks_from_arrow, lopq_tasks.encode_batches,
         tiles_tasks.emit_partition, tiles_tasks.reduce_target]
for fn in TASKS:
    sys.path_importer_cache[sys.argv[1]] = zipimport.zipimporter(sys.argv[1])
    args = [None] * sum(p.default is p.empty for p in inspect.signature(fn).parameters.values())
    try:
        next(fn(*args))    # a task's first step; None arguments fail after it
    except Exception:
        pass
    print(fn.__module__.split(".")[-1] + "." + fn.__name__, type(sys.path_importer_cache[sys.argv[1]]).__name__)
"""


def test_every_pyspark_task_keeps_spark_zip_directories(tmp_path):
    spark_zip = tmp_path / "pyspark.zip"
    make_zip(spark_zip, "zpkg")
    res = subprocess.run([sys.executable, "-c", TASKS, str(spark_zip)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")[:-1]
    assert len(lines) == 8 and all(line.endswith(" _SparkZipImporter") for line in lines), res.stdout
