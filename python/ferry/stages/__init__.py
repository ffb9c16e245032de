"""The built-in stages: pure numpy numerics, each registered with the stage contract.

Nothing here imports Spark or gRPC; the worker and the PySpark path both call these.
"""
from ferry.stages import convolve  # noqa: F401  (registers the stage)
from ferry.stages import tiles  # noqa: F401
from ferry.stages import lopq  # noqa: F401
