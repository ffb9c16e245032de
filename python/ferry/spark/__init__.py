"""The PySpark path: ferry's stages as pyspark.ml stages, run in-process (no gRPC hop)."""
from ferry.spark.convolve import Convolve

__all__ = ["Convolve"]
