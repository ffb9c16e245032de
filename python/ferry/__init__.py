"""ferry: Python stages for JVM Spark."""

from ferry.stages.convolve import convolve

__version__ = "0.1.0"
__all__ = ["convolve", "__version__"]
