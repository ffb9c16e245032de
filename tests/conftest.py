import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def worker():
    """A real worker process with the test stages, on a free loopback port."""
    from ferry.worker import start_worker

    # This checkout's python/ first, so that the worker runs this code wherever another ferry is installed.
    path = os.pathsep.join([os.path.join(ROOT, "python"), ROOT])
    w = start_worker(stages=["tests.stages_for_tests"], env={"PYTHONPATH": path})
    yield w
    w.stop()


@pytest.fixture(scope="session")
def client(worker):
    with worker.client() as c:
        yield c


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """A local[2] SparkSession whose Python workers use this interpreter."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    tmp = tmp_path_factory.mktemp("spark")
    session = (SparkSession.builder.master("local[2]").appName("ferry-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "4096")
               .config("spark.sql.warehouse.dir", str(tmp / "warehouse"))
               .config("spark.local.dir", str(tmp / "local"))
               .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={tmp}")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
