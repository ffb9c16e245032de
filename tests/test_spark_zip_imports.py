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
