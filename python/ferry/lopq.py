"""``ferry.lopq``: the public LOPQ API (an alias of ferry.stages.lopq).

>>> from ferry.lopq import LOPQModel, fit, LOPQSearcher      # doctest: +SKIP
>>> model = fit(X, V=16, M=8)
>>> coarse, fine = model.encode(X)
>>> model.save("model.lopq"); LOPQModel.load("model.lopq")
"""
from ferry.stages.lopq import *  # noqa: F401,F403
from ferry.stages.lopq import __all__  # noqa: F401
