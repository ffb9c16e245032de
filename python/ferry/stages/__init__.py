"""The built-in stages: pure numpy numerics, each registered with the stage contract.

Nothing here imports Spark or gRPC; the worker and the PySpark path both call these. Importing
a stage module registers it; `ferry.registry` imports all of BUILTIN when asked for a stage,
so importing one stage (as PySpark's executors do) does not pay for the others.
"""

BUILTIN = ("ferry.stages.convolve", "ferry.stages.tiles", "ferry.stages.lopq")
