"""The PySpark path: ferry's stages as pyspark.ml stages, run in-process (no gRPC hop)."""

__all__ = ["Convolve"]
__all__ += ["LopqEncoder", "LopqModel"]


def __getattr__(name):
    # Deferred: executors import ferry.spark's task modules, which must not pay for pyspark.ml.
    if name == "Convolve":
        from ferry.spark.convolve import Convolve
        return Convolve
    if name in ("LopqEncoder", "LopqModel"):
        from ferry.spark import lopq
        return getattr(lopq, name)
    raise AttributeError(f"module 'ferry.spark' has no attribute {name!r}")
