"""LOPQ's own error types, each a subclass of the ferry error the worker already maps."""
from ferry.errors import InputError


class ModelFormatError(InputError):
    """A model file is not a readable LOPQ protobuf: truncated, foreign, a pickle, inconsistent."""


class UnsafePickleError(InputError):
    """A pickled vector names something other than a numpy array; it is refused, never run."""
