"""Msgpack codec with validation: bytes from the network become typed records or a
`ProtocolError`, never anything in between.

A record is a frozen dataclass whose field annotations say what is accepted:

    @dataclass(frozen=True)
    class Login(Record):
        username: Username          # Annotated[str, Pattern(...)]
        password: Annotated[str, MaxLen(1024)]

`from_wire(cls, value)` checks that `value` is a map with exactly the record's keys
(fields with a default may be absent) and that every value matches its annotation:
`str`, `bytes`, `int`, `bool`, `list[T]`, `T | None` and nested records, with
`MaxLen`, `Size`, `Range` and `Pattern` limits. Nothing else is accepted: no floats,
no extension types, no unknown keys, no NUL character in any text. `to_wire(record)` is
the inverse.

Bounded work, whatever arrives: every `str`, `bytes` and `list` field must declare a
`MaxLen` or `Size` (a record that does not is refused when it is first used, as a
programming error), and sizes are always checked before patterns, so a regular
expression never runs over more than a field's limit.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin

import msgpack

from sfs.common.errors import ProtocolError

# msgpack's C unpacker refuses nesting deeper than its stack (1024 levels); these bound
# the rest. Per container: msgpack allocates a container's slots when it reads the header,
# before any item, so a few bytes of nested headers would otherwise reserve megabytes. The
# longest list in the protocol is an access list of 1000 names.
MAX_CONTAINER_ITEMS = 1024
# Per document, all containers together: small strings and numbers decode to objects
# up to twenty times their size on the wire, so a 16 MiB frame of them would take
# hundreds of MiB. The largest real document, a search result of 500 hits, has ~36,000.
MAX_DOCUMENT_ITEMS = 65_536


@dataclass(frozen=True)
class MaxLen:
    """At most this many characters, bytes or list items."""

    limit: int


@dataclass(frozen=True)
class Size:
    """Exactly this many bytes."""

    size: int


@dataclass(frozen=True)
class Range:
    low: int
    high: int


@dataclass(frozen=True)
class Pattern:
    regex: str

    def matches(self, text: str) -> bool:
        return re.fullmatch(self.regex, text) is not None


class Record:
    """Base for wire records (subclasses are frozen dataclasses)."""

    __wire_fields__: ClassVar[dict[str, Any]]


R = TypeVar("R", bound=Record)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension types are not part of the protocol")


_Container = TypeVar("_Container", list[Any], dict[Any, Any])


class _ItemBudget:
    """msgpack hooks that charge every decoded list and map to one budget of items."""

    def __init__(self, items: int) -> None:
        self.left = items

    def charge(self, container: _Container) -> _Container:
        self.left -= len(container)
        if self.left < 0:
            raise ProtocolError(f"malformed frame: more than {MAX_DOCUMENT_ITEMS} items")
        return container


def unpack(frame: bytes) -> Any:
    """Decode one msgpack frame, translating every failure into `ProtocolError`."""
    budget = _ItemBudget(MAX_DOCUMENT_ITEMS)
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            list_hook=budget.charge,
            object_hook=budget.charge,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many unrelated types on bad input
        raise ProtocolError("malformed frame: not a valid msgpack document") from exc


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def wire_fields(cls: type[Record]) -> dict[str, Any]:
    """The field annotations of a record, checked once (see `_require_bounds`)."""
    cached = cls.__dict__.get("__wire_fields__")
    if cached is None:
        cached = typing.get_type_hints(cls, include_extras=True)
        cached = {f.name: cached[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for name, annotation in cached.items():
            _require_bounds(annotation, f"{cls.__name__}.{name}")
        cls.__wire_fields__ = cached
    return cached


def _require_bounds(annotation: Any, where: str) -> None:
    """Refuse a field whose text, bytes or items have no size limit: decoding it could
    take work in proportion to a whole frame."""
    limits: tuple[Any, ...] = ()
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        limits = tuple(extra)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            if option is not type(None):
                _require_bounds(option, where)
        return
    sized = origin is list or annotation in (str, bytes)
    if sized and not any(isinstance(limit, MaxLen | Size) for limit in limits):
        raise TypeError(f"{where}: a wire field of {annotation} needs a MaxLen or Size")
    if origin is list:
        _require_bounds(get_args(annotation)[0], f"{where}[]")


def _check(value: Any, annotation: Any, where: str) -> Any:
    limits: tuple[Any, ...] = ()
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        limits = tuple(extra)
    origin = get_origin(annotation)

    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check(value, inner, where)

    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        _check_limits(value, limits, where)
        (item_type,) = get_args(annotation)
        return [_check(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]

    if isinstance(annotation, type) and issubclass(annotation, Record):
        return from_wire(annotation, value, where)

    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation in (str, bytes):
        ok = isinstance(value, annotation)
    else:  # a programming error in a record definition, not bad input
        raise TypeError(f"unsupported wire annotation {annotation!r}")
    if not ok:
        raise ProtocolError(f"{where}: expected {annotation.__name__}")
    _check_limits(value, limits, where)
    return value


def _check_limits(value: Any, limits: tuple[Any, ...], where: str) -> None:
    # Sizes first, whatever order the annotation lists them in: a pattern runs only over
    # a value already known to be short.
    for limit in sorted(limits, key=lambda limit: isinstance(limit, Pattern)):
        if isinstance(limit, MaxLen) and len(value) > limit.limit:
            raise ProtocolError(f"{where}: longer than {limit.limit}")
        if isinstance(limit, Size) and len(value) != limit.size:
            raise ProtocolError(f"{where}: expected exactly {limit.size} bytes")
        if isinstance(limit, Range) and not limit.low <= value <= limit.high:
            raise ProtocolError(f"{where}: out of range")
        if isinstance(limit, Pattern) and not limit.matches(value):
            raise ProtocolError(f"{where}: not a valid value")
    # No NUL in any text: C strings, SQL full-text queries and PostgreSQL's text type
    # cannot hold it, and no name, term or message needs it.
    if isinstance(value, str) and "\0" in value:
        raise ProtocolError(f"{where}: contains a NUL character")


def _prefix(key: Any) -> Any:
    return key[:100] if isinstance(key, str | bytes) else key


def from_wire(cls: type[R], value: Any, where: str = "message") -> R:
    """Validate a decoded map into a `cls` record or raise `ProtocolError`."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a map")
    hints = wire_fields(cls)
    unknown = set(value) - set(hints)
    if unknown:
        # str keys first, in order; bytes keys (msgpack allows them) must not break sorting.
        # Keys are cut short first: one may be megabytes (str() of bytes quadruples it).
        first = min((_prefix(k) for k in unknown), key=lambda k: (not isinstance(k, str), str(k)))
        raise ProtocolError(f"{where}: unexpected field {reprlib.repr(first)}")
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in value:
            kwargs[field.name] = _check(value[field.name], hints[field.name], f"{field.name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {field.name!r}")
    return cls(**kwargs)


def to_wire(record: Record) -> dict[str, Any]:
    """The map form of a record (nested records become maps too)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(record):  # type: ignore[arg-type]
        out[field.name] = _plain(getattr(record, field.name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return to_wire(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
