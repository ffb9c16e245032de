"""The exceptions ferry raises in-process; the worker maps each to a gRPC status.

Every message says what was expected, what was found, and how to fix it.
"""


class FerryError(Exception):
    """Base class of every error ferry raises on purpose."""

    #: The StageError.category this error travels as on the wire.
    category = "stage_failed"


class UnknownStageError(FerryError, LookupError):
    """No stage is registered under the requested name."""

    category = "unknown_stage"


class InvalidParamsError(FerryError, ValueError):
    """A stage param is missing, of the wrong type, or out of range."""

    category = "invalid_params"


class SchemaError(FerryError, ValueError):
    """The input columns do not match what the stage reads."""

    category = "invalid_schema"


class InputError(FerryError, ValueError):
    """The data itself is invalid for the stage (nulls, ids out of range, missing halo...)."""

    category = "invalid_input"


class MissingResourceError(FerryError, LookupError):
    """A Run names a resource digest the worker has not been given."""

    category = "missing_resource"


class StageFailedError(FerryError, RuntimeError):
    """A stage raised an exception that is not one of the errors above."""

    category = "stage_failed"


class AuthenticationError(FerryError, PermissionError):
    """A worker call carried no bearer token, or the wrong one."""

    category = "unauthenticated"


class ProtocolError(FerryError, RuntimeError):
    """A Run stream broke the protocol (no Open first, a Batch after End, ...)."""

    category = "protocol"


class WorkerUnavailableError(FerryError, ConnectionError):
    """The worker could not be reached or died: not an error raised by a stage."""

    category = "unavailable"


#: category on the wire -> the exception a client raises for it.
BY_CATEGORY = {cls.category: cls for cls in (
    UnknownStageError, InvalidParamsError, SchemaError, InputError, MissingResourceError,
    StageFailedError, AuthenticationError, ProtocolError, WorkerUnavailableError)}
