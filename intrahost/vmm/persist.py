"""The state of a machine, component by component: each saves itself and restores itself.

A *component* is a piece of a machine with state of its own: the VM's in-kernel state, each
vCPU, each device, the SEV launch record. It has a stable name (``vm``, ``vcpu/0``,
``device/uart``, ``sev/launch``) and saves itself to named *parts*: a kernel struct's raw bytes
(the KVM ABI is stable), or a small JSON record. A part is stored under ``NAME/PART``, or under
``NAME`` itself for the part named ``""``. The names are a contract between VMM versions: a
newer VMM must read what an older one wrote and the other way round (a rollback).

Restoring is two steps for every component, so that a malformed state touches nothing:
:meth:`Persist.load_parts` decodes and validates the parts and returns the function that
applies them; the caller runs the appliers only once every component has loaded. The
machine lists its components in restore order (``Machine.components``).

JSON records are frozen dataclasses deriving from :class:`JsonRecord`: their JSON form is
built from the dataclass fields, read tolerantly (unknown keys are ignored, so a newer writer
may add fields; a missing field without a default is an error that names it) and type-checked.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, Union, cast

from intrahost.errors import IntrahostError


class StateFormatError(IntrahostError):
    """A saved state is malformed, too large, of another format, or lacks a component."""


class StateImportError(IntrahostError):
    """The destination cannot take the saved state (the kernel refused part of it)."""


#: What :meth:`Persist.load_parts` returns: applies the loaded state (may raise
#: StateImportError when the kernel refuses it).
Apply = Callable[[], None]


class PartSource(Protocol):
    """Where parts are read from: a decoded state envelope, by full component name."""

    def get(self, name: str, /) -> bytes | None: ...


class Persist(Protocol):
    """A component of a machine's state."""

    def save_parts(self) -> list[tuple[str, bytes]]:
        """The component's parts, ``(part name, payload)``, with the machine paused."""
        ...

    def load_parts(self, parts: Parts) -> Apply:
        """Decode and validate the parts; touch nothing. Returns what applies them."""
        ...


def part_name(component: str, part: str) -> str:
    return f"{component}/{part}" if part else component


def json_object(name: str, payload: bytes) -> dict[str, Any]:
    """The JSON object a part holds; StateFormatError naming ``name`` otherwise."""
    try:
        value = json.loads(payload)
    except RecursionError:
        raise StateFormatError(f"component {name!r} nests too deeply to be read") from None
    except ValueError as e:  # not UTF-8, not JSON, or a number of over 4300 digits
        raise StateFormatError(f"component {name!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise StateFormatError(f"component {name!r} is not a JSON object")
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def json_payload(value: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys (one encoder for all: json.dumps with options builds a
    new one per call)."""
    return _ENCODER.encode(value).encode()


class Parts:
    """The saved parts of one component, looked up by part name."""

    __slots__ = ("_source", "component")

    def __init__(self, source: PartSource, component: str) -> None:
        self.component = component
        self._source = source

    def name(self, part: str = "") -> str:
        return part_name(self.component, part)

    def get(self, part: str = "") -> bytes | None:
        return self._source.get(self.name(part))

    def need(self, part: str = "") -> bytes:
        data = self._source.get(self.name(part))
        if data is None:
            raise StateFormatError(
                f"the saved state lacks the required component {self.name(part)!r}"
            )
        return data

    def json(self, part: str = "") -> dict[str, Any]:
        return json_object(self.name(part), self.need(part))

    def record(self, kind: type[R], part: str = "") -> R:
        """The part as a ``kind`` record; errors name the component."""
        return kind.from_dict(self.json(part), where=f"component {self.name(part)!r}")

    def struct(
        self, part: str, kind: type[ctypes.Structure], required: bool = True
    ) -> bytes | None:
        """The raw bytes of exactly one ``kind`` struct (None for an absent optional part)."""
        data = self.need(part) if required else self.get(part)
        if data is not None and len(data) != ctypes.sizeof(kind):
            raise StateFormatError(
                f"component {self.name(part)!r} holds {len(data)} bytes; a {kind.__name__} "
                f"has {ctypes.sizeof(kind)}"
            )
        return data


# --- JSON records ---------------------------------------------------------------------------

R = TypeVar("R", bound="JsonRecord")

_CODEC = "intrahost.persist.codec"
_MAX = "intrahost.persist.max"


def converted(to_json: Callable[[Any], Any], from_json: Callable[[Any], Any], **kwargs: Any) -> Any:
    """A record field with its own JSON form: ``from_json`` validates (raising the record's
    error) and converts. ``kwargs`` go to ``dataclasses.field``."""
    metadata = {**kwargs.pop("metadata", {}), _CODEC: (to_json, from_json)}
    return dataclasses.field(metadata=metadata, **kwargs)


def bounded(maximum: int, **kwargs: Any) -> Any:
    """An integer record field that must lie in ``0..maximum`` when read."""
    metadata = {**kwargs.pop("metadata", {}), _MAX: maximum}
    return dataclasses.field(metadata=metadata, **kwargs)


_TYPE_WORDS = {int: "an integer", bool: "a bool", str: "a string", bytes: "a hex string"}


@dataclass(frozen=True)
class _Field:
    name: str
    kind: type  # int, bool, str, bytes, or object for a converted field
    optional: bool  # ``X | None``
    required: bool  # no default
    maximum: int | None
    to_json: Callable[[Any], Any] | None
    from_json: Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Codec:
    fields: tuple[_Field, ...]
    plain: tuple[str, ...]  # fields whose JSON value is the attribute itself
    get_plain: Callable[[Any], tuple[Any, ...]]  # their values, in that order
    converted: tuple[tuple[str, Callable[[Any], Any]], ...]  # the others, with their encoder
    required: frozenset[str]


def _codec_of(cls: type[JsonRecord]) -> _Codec:
    """The precomputed field list of a record class (built once, on first use)."""
    codec = cls.__dict__.get("_record_codec")
    if codec is not None:
        return codec  # type: ignore[no-any-return]
    hints = typing.get_type_hints(cls)
    built = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        optional = False
        if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in hint.__args__:
            optional = True
            (hint,) = (a for a in hint.__args__ if a is not type(None))
        codec_pair = f.metadata.get(_CODEC)
        kind = hint if hint in _TYPE_WORDS else object
        if kind is object and codec_pair is None:
            raise TypeError(f"{cls.__name__}.{f.name}: give a JSON form with converted()")
        built.append(
            _Field(
                f.name,
                kind,
                optional,
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                f.metadata.get(_MAX),
                codec_pair[0] if codec_pair else (bytes.hex if kind is bytes else None),
                codec_pair[1] if codec_pair else None,
            )
        )
    plain = tuple(f.name for f in built if f.to_json is None)
    codec = _Codec(
        tuple(built),
        plain,
        (lambda _record: ()) if not plain else _tuple_getter(plain),
        tuple((f.name, f.to_json) for f in built if f.to_json is not None),
        frozenset(f.name for f in built if f.required),
    )
    cls._record_codec = codec
    return codec


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else lambda record: (get(record),)


class JsonRecord:
    """Base of the frozen dataclasses saved as one JSON object (see the module docstring).

    Class keywords: ``label`` (how errors name the record), ``error`` (the exception type
    raised for a malformed record), ``version`` (written as ``"version"`` and required to be
    equal on reading; bump it only for a change an older reader must refuse).
    """

    label: ClassVar[str] = "record"
    error: ClassVar[type[Exception]] = StateFormatError
    version: ClassVar[int | None] = None
    _record_codec: ClassVar[_Codec | None] = None
    _records: ClassVar[list[type[JsonRecord]]] = []
    __slots__ = ()

    def __init_subclass__(
        cls,
        *,
        label: str | None = None,
        error: type[Exception] | None = None,
        version: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        # (dataclass(slots=True) creates the class again, without these keywords.)
        if label is not None:
            cls.label = label
        if error is not None:
            cls.error = error
        if version is not None:
            cls.version = version
        cls._record_codec = None
        JsonRecord._records.append(cls)

    def check(self) -> None:
        """Rules across fields, run by :meth:`from_dict` (not on every construction: a
        record is built in the hand-off's pause)."""

    def to_dict(self) -> dict[str, Any]:
        codec = _codec_of(type(self))
        out = dict(zip(codec.plain, codec.get_plain(self), strict=True))
        for name, to_json in codec.converted:
            value = getattr(self, name)
            out[name] = None if value is None else to_json(value)
        if self.version is not None:
            out["version"] = self.version
        return out

    def to_json(self) -> bytes:
        return json_payload(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        """Validate and rebuild a record made by :meth:`to_dict` (by this or another VMM
        version): unknown keys are ignored, a missing field without a default is named."""
        label = where or cls.label
        error = cls.error
        if not isinstance(data, Mapping):
            raise error(f"{label} must be a JSON object (a mapping), got {type(data).__name__}")
        codec = _codec_of(cls)
        if cls.version is not None:
            if "version" not in data:
                raise error(f"{label}: missing keys ['version']")
            if data["version"] != cls.version:
                raise error(
                    f"{label} version {data['version']!r} is not supported (this intrahost "
                    f"reads version {cls.version}); use matching VMM versions"
                )
        missing = codec.required - data.keys()
        if missing:
            raise error(f"{label}: missing keys {sorted(missing)}")
        args: dict[str, Any] = {}
        for f in codec.fields:
            if f.name not in data:
                continue
            value: Any = data[f.name]
            if value is None and f.optional:
                args[f.name] = None
            elif f.from_json is not None:
                args[f.name] = f.from_json(value)
            elif f.kind is bytes:
                if type(value) is not str:
                    raise error(f"{label}: {f.name} must be a hex string")
                try:
                    args[f.name] = bytes.fromhex(value)
                except ValueError:
                    raise error(f"{label}: {f.name} is not valid hex") from None
            elif type(value) is not f.kind:
                raise error(
                    f"{label}: {f.name} must be {_TYPE_WORDS[f.kind]}"
                    + (" or null" if f.optional else "")
                    + f", got {value!r:.40}"
                )
            elif f.maximum is not None and not 0 <= cast(int, value) <= f.maximum:
                raise error(
                    f"{label}: {f.name} must be an integer in 0..{f.maximum:#x}, got {value!r}"
                )
            else:
                args[f.name] = value
        record = cls(**args)
        record.check()
        return record

    @classmethod
    def from_parts(cls, parts: Parts, part: str = "") -> Self:
        return parts.record(cls, part)


def prepare_records() -> None:
    """Build every record class's field list now (a VMM calls this before a hand-off's pause,
    so the first save or load in the pause does not)."""
    for cls in list(JsonRecord._records):
        if dataclasses.is_dataclass(cls):
            _codec_of(cls)


# --- a component made of one record ---------------------------------------------------------


class RecordState(Generic[R]):
    """A component whose state is one JSON record (a device, the SEV launch record):
    ``save()`` returns the record (None: nothing to save), ``restore(record)`` applies it.
    ``optional``: an absent record is not an error and restores nothing.

    ``save_json``: what saves instead of ``save().to_json()`` — the same bytes, formatted
    directly by a component saved in a hand-off's pause, where the generic encoder (and the
    record's construction) would cost several times as much."""

    def __init__(
        self,
        kind: type[R],
        save: Callable[[], R | None],
        restore: Callable[[R], None],
        optional: bool = False,
        save_json: Callable[[], bytes] | None = None,
    ) -> None:
        self.kind = kind
        self.save = save
        self.restore = restore
        self.optional = optional
        self.save_json = save_json

    def save_parts(self) -> list[tuple[str, bytes]]:
        if self.save_json is not None:
            return [("", self.save_json())]
        record = self.save()
        return [] if record is None else [("", record.to_json())]

    def load_parts(self, parts: Parts) -> Apply:
        if self.optional and parts.get() is None:
            return _nothing
        record = parts.record(self.kind)
        return lambda: self.restore(record)


def _nothing() -> None:
    pass
