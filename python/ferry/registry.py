"""The stage contract: every Python stage is registered here with its params and schemas.

A stage declares its kind, a param spec and a function from input Arrow schema + params to the
output Arrow schema. The worker advertises exactly this (ListStages / Describe), so the JVM
wrappers validate params and compute output schemas from the same source of truth.

A stateless map stage is a function ``fn(batch: pa.RecordBatch, **params) -> pa.RecordBatch``.
A stateful map stage is a class instantiated once per Run with the params as keyword arguments
(and ``resources=`` when it reads resources), with ``process(batch) -> pa.RecordBatch`` and an
optional ``finish()`` called when the stream ends. ``finish`` returns None, one batch, or an
iterable of batches: a stage that holds much back (sums, whole images) yields it in pieces, so
the first piece travels while the next is made and no batch has to hold it all.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow as pa

from ferry.errors import InvalidParamsError, SchemaError, UnknownStageError

KINDS = ("map", "group", "reduce")
PARAM_TYPES = ("bool", "int", "float", "string", "float_list", "int_list", "string_list", "json")

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One stage param: its name, type, default (omit for a required param) and checks."""

    name: str
    type: str
    doc: str = ""
    default: Any = _REQUIRED
    choices: tuple[str, ...] = ()
    #: Extra check on the converted value; returns an error message or None.
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name!r}: type must be one of {PARAM_TYPES}, got {self.type!r}")

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def convert(self, stage: str, value: Any) -> Any:
        """Returns value converted to this param's type, or raises InvalidParamsError."""
        where = f"Stage {stage!r} param {self.name!r}"
        try:
            converted = _CONVERTERS[self.type](value)
        except (TypeError, ValueError) as e:
            raise InvalidParamsError(
                f"{where} must be of type {self.type}, got {value!r} ({type(value).__name__}): {e}"
            ) from None
        if self.choices and converted not in self.choices:
            raise InvalidParamsError(
                f"{where} must be one of {', '.join(map(repr, self.choices))}, got {converted!r}"
            )
        if self.check is not None:
            problem = self.check(converted)
            if problem:
                raise InvalidParamsError(f"{where}: {problem}")
        return converted


def _to_bool(v):
    if isinstance(v, bool):
        return v
    raise TypeError("expected true or false")


def _to_int(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise TypeError("expected an integer")
    return int(v)


def _to_float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return float(v)
        raise TypeError("expected a number")
    return float(v)


def _to_str(v):
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _list_of(conv):
    def convert(v):
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise TypeError("expected a list")
        return [conv(x) for x in v]
    return convert


_CONVERTERS = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "string": _to_str,
    "float_list": _list_of(_to_float),
    "int_list": _list_of(_to_int),
    "string_list": _list_of(_to_str),
    "json": lambda v: v,
}


@dataclasses.dataclass
class Stage:
    """A registered stage: what the worker and the PySpark path run, and what they advertise."""

    name: str
    version: str
    kind: str
    doc: str
    params: tuple[Param, ...]
    output_schema_fn: Callable[[pa.Schema, dict], pa.Schema]
    impl: Callable[..., Any]
    input_doc: str = ""
    uses_resources: bool = False

    def resolve_params(self, given: Mapping[str, Any] | None) -> dict:
        """Applies defaults, converts and checks every param; rejects unknown names."""
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidParamsError(
                f"Stage {self.name!r} has no param(s) {', '.join(map(repr, unknown))}; "
                f"its params are {', '.join(sorted(known)) or '(none)'}"
            )
        resolved = {}
        for p in self.params:
            if p.name in given:
                resolved[p.name] = p.convert(self.name, given[p.name])
            elif p.required:
                raise InvalidParamsError(
                    f"Stage {self.name!r} requires param {p.name!r} ({p.type}): {p.doc or 'no default'}"
                )
            else:
                resolved[p.name] = p.default
        return resolved

    def output_schema(self, input_schema: pa.Schema, params: Mapping[str, Any]) -> pa.Schema:
        """The output schema for this input schema and these (resolved) params."""
        return self.output_schema_fn(input_schema, dict(params))

    def open(self, params: Mapping[str, Any], resources: Mapping[str, bytes] | None = None):
        """Returns a processor with process(batch) and finish() for one stream."""
        kwargs = dict(params)
        if self.uses_resources:
            kwargs["resources"] = dict(resources or {})
        if inspect.isclass(self.impl):
            return self.impl(**kwargs)
        return _FunctionProcessor(self.impl, kwargs)

    def describe(self) -> dict:
        return {
            "name": self.name, "version": self.version, "kind": self.kind, "doc": self.doc,
            "input_doc": self.input_doc,
            "params": [
                {"name": p.name, "type": p.type, "doc": p.doc, "required": p.required,
                 "default": None if p.required else p.default, "choices": list(p.choices)}
                for p in self.params
            ],
        }


class _FunctionProcessor:
    def __init__(self, fn, kwargs):
        self._fn, self._kwargs = fn, kwargs

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return self._fn(batch, **self._kwargs)

    def finish(self):
        return None


def finish_results(processor) -> Iterator:
    """What ``processor.finish()`` returned, as a sequence: nothing, the one result, or each
    result of the iterable it returned (see the module doc)."""
    got = processor.finish() if hasattr(processor, "finish") else None
    if got is None:
        return iter(())
    if isinstance(got, (pa.RecordBatch, pa.Table, dict)):
        return iter((got,))
    return iter(got)


_STAGES: dict[str, Stage] = {}


def stage(name: str, *, params: Iterable[Param] = (), output_schema: Callable[[pa.Schema, dict], pa.Schema],
          kind: str = "map", version: str = "1", doc: str | None = None, input_doc: str = "",
          uses_resources: bool = False, replace: bool = False):
    """Registers a stage under ``name``; usable as a decorator on a function or a class.

    ``output_schema(input_schema, params)`` must raise :class:`SchemaError` for an input it
    cannot read, naming the column and the expected type.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def register(impl):
        if name in _STAGES and not replace and _STAGES[name].impl is not impl:
            raise ValueError(f"A stage named {name!r} is already registered; pass replace=True to override it")
        _STAGES[name] = Stage(
            name=name, version=version, kind=kind, doc=inspect.cleandoc(doc or impl.__doc__ or ""),
            params=tuple(params), output_schema_fn=output_schema, impl=impl, input_doc=input_doc,
            uses_resources=uses_resources,
        )
        return impl

    return register


def get(name: str) -> Stage:
    """The stage registered under ``name``; raises UnknownStageError listing the known ones."""
    if name in _STAGES:  # registered already: no need to import every other stage module
        return _STAGES[name]
    _load_builtins()
    try:
        return _STAGES[name]
    except KeyError:
        raise UnknownStageError(
            f"No stage named {name!r}; registered stages: {', '.join(sorted(_STAGES)) or '(none)'}. "
            "Register it with @ferry.registry.stage, or start the worker with --stages MODULE"
        ) from None


def stages() -> list[Stage]:
    _load_builtins()
    return [_STAGES[k] for k in sorted(_STAGES)]


def _load_builtins():
    # Importing the stage modules registers them; deferred so `import ferry.registry` stays cheap.
    import importlib

    from ferry.stages import BUILTIN

    for module in BUILTIN:
        importlib.import_module(module)


def to_json(value: Any) -> str:
    """JSON of a param value or of a params object (numpy arrays become lists)."""
    return json.dumps(value, allow_nan=True, sort_keys=True, default=_json_default)


def params_to_json(params: Mapping[str, Any]) -> str:
    return to_json(dict(params))


def _json_default(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def params_from_json(text: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidParamsError(f"params must be a JSON object; could not parse {text[:200]!r}: {e}") from None
    if not isinstance(value, dict):
        raise InvalidParamsError(f"params must be a JSON object, got {type(value).__name__}: {text[:200]!r}")
    return value


def require_columns(stage_name: str, schema: pa.Schema, wanted: Mapping[str, Iterable[pa.DataType] | pa.DataType],
                    optional: Iterable[str] = ()) -> None:
    """Raises SchemaError unless every wanted column exists with one of the allowed types."""
    optional = set(optional)
    for column, allowed in wanted.items():
        allowed = [allowed] if isinstance(allowed, pa.DataType) else list(allowed)
        idx = schema.get_field_index(column)
        if idx < 0:
            if column in optional:
                continue
            raise SchemaError(
                f"Stage {stage_name!r} needs an input column {column!r} of type "
                f"{' or '.join(map(str, allowed))}; the input has columns {schema.names}"
            )
        found = schema.field(idx).type
        if found not in allowed:
            raise SchemaError(
                f"Stage {stage_name!r}: column {column!r} must be of type {' or '.join(map(str, allowed))}, "
                f"found {found}; cast it first"
            )

