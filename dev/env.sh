# Sourced by the dev scripts: the environment every ferry run and test uses.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYSPARK_PYTHON="$ROOT/.venv/bin/python"
export PYSPARK_DRIVER_PYTHON="$ROOT/.venv/bin/python"
export FERRY_PYTHON="$ROOT/.venv/bin/python"
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
