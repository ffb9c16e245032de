"""ferry's own exceptions back from PySpark tasks.

A stage that raises inside a Python worker reaches the driver as pyspark's PythonException,
whose text holds the worker's traceback; :func:`ferry_errors` turns it back into the ferry
exception the stage raised, so a caller catches ``TileError`` on every path alike.
"""
from __future__ import annotations

import contextlib
import re

from pyspark.errors import PythonException

from ferry.errors import FerryError, InputError, InvalidParamsError, SchemaError, StageFailedError
from ferry.stages.tiles import TileError, TileKey

_KINDS = {cls.__name__: cls for cls in (InputError, InvalidParamsError, SchemaError, StageFailedError)}
_LAST_LINE = re.compile(r"^(?:ferry\.[\w.]+\.)(\w+Error): (.+)$", re.M)
_TILE = re.compile(r"^tile \(image '(.*)', z=(-?\d+), x=(-?\d+), y=(-?\d+)\): (.*)$", re.S)


def from_python_exception(e: BaseException) -> FerryError | None:
    """The ferry exception a PythonException carries, or None when a ferry stage did not raise it."""
    found = _LAST_LINE.findall(str(e))
    if not found:
        return None
    name, message = found[-1]
    if name == "TileError":
        m = _TILE.match(message)
        if m:
            return TileError(TileKey(m[1], int(m[2]), int(m[3]), int(m[4])), m[5])
        return TileError(None, message.removeprefix("tile: "))
    cls = _KINDS.get(name)
    return cls(message) if cls else None


@contextlib.contextmanager
def ferry_errors():
    """Runs Spark actions so that a ferry error raised in a task is raised again as itself.

    >>> from ferry.spark import ferry_errors
    >>> with ferry_errors():
    ...     pass
    """
    try:
        yield
    except PythonException as e:
        err = from_python_exception(e)
        if err is None:
            raise
        raise err from e
