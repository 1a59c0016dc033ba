"""The saved-state envelope: a versioned, checksummed, size-capped set of named components.

Layout (little-endian)::

    header   magic "IHSTATE\\0" | major u16 | minor u16 | count u32 | body_len u64 | crc32 u32
    body     count x ( name_len u16 | flags u16 | payload_len u32 | name | payload )

A component is a name ("vcpu/0/regs", "device/uart", ...) and its payload: a kernel struct's
raw bytes, or a JSON object for a record of the VMM's own. Flag bit 0 marks a component
*required*.

Compatibility, so that a newer VMM reads an older state and an older VMM reads a newer one
(a rollback):
* ``major`` changes only if this container layout changes; a reader refuses another major.
  ``minor`` counts content revisions and is informative: any minor is read.
* A reader ignores components it does not know unless they are required; a required unknown
  component is refused (the writer said the state means something else without it). A
  missing component that the reader needs is an error naming it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple

from intrahost.vmm.persist import StateFormatError, json_object, json_payload

MAGIC = b"IHSTATE\0"
MAJOR = 1
MINOR = 2
HEADER = struct.Struct("<8sHHIQI")
ENTRY = struct.Struct("<HHI")
REQUIRED = 1

MAX_STATE_BYTES = 64 << 20
MAX_COMPONENTS = 8192
MAX_NAME_BYTES = 128


class Component(NamedTuple):
    """One named part of a state (a tuple: built and read in the hand-off's pause)."""

    name: str
    payload: bytes
    required: bool = True


def encode(components: Iterable[Component], minor: int = MINOR) -> bytes:
    return encode_entries(
        ((entry_name(c.name), c.payload, REQUIRED if c.required else 0) for c in components),
        minor,
    )


def entry_name(name: str) -> bytes:
    """A component name as the envelope stores it; StateFormatError if it can't be."""
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME_BYTES:
        raise StateFormatError(f"component name {name!r} is empty or too long")
    return raw


def encode_entries(entries: Iterable[tuple[bytes, bytes, int]], minor: int = MINOR) -> bytes:
    """The envelope of ``(name from entry_name(), payload, flags)`` entries, in order."""
    parts: list[bytes] = []
    pack = ENTRY.pack
    count = 0
    for name, payload, flags in entries:
        parts += (pack(len(name), flags, len(payload)), name, payload)
        count += 1
    body = b"".join(parts)
    if len(body) + HEADER.size > MAX_STATE_BYTES or count > MAX_COMPONENTS:
        raise StateFormatError(f"state of {len(body)} bytes in {count} components is too large")
    return HEADER.pack(MAGIC, MAJOR, minor, count, len(body), zlib.crc32(body)) + body


class State:
    """A decoded envelope: look components up by name."""

    def __init__(self, minor: int, components: dict[str, Component]) -> None:
        self.minor = minor
        self.components = components

    def get(self, name: str) -> bytes | None:
        c = self.components.get(name)
        return None if c is None else c.payload

    def need(self, name: str) -> bytes:
        c = self.components.get(name)
        if c is None:
            raise StateFormatError(f"the saved state lacks the required component {name!r}")
        return c.payload

    def need_json(self, name: str) -> dict[str, Any]:
        return json_object(name, self.need(name))

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.components if n.startswith(prefix)]


def decode(data: bytes, understood: Iterable[str] | None = None) -> State:
    """Validate and split an envelope.

    ``understood``: name prefixes this reader knows; a required component outside them is
    refused. ``None`` accepts every name.
    """
    if len(data) > MAX_STATE_BYTES:
        raise StateFormatError(f"state of {len(data)} bytes exceeds the {MAX_STATE_BYTES} cap")
    if len(data) < HEADER.size:
        raise StateFormatError("state is shorter than its header")
    magic, major, minor, count, body_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateFormatError("not an intrahost saved state (bad magic)")
    if major != MAJOR:
        raise StateFormatError(
            f"saved state has container format {major}.{minor}; this VMM reads format "
            f"{MAJOR}.x only"
        )
    body = data[HEADER.size :]
    if body_len != len(body):
        raise StateFormatError(f"state body is {len(body)} bytes, header says {body_len}")
    if zlib.crc32(body) != crc:
        raise StateFormatError("state checksum mismatch: the state was corrupted in transit")
    if count > MAX_COMPONENTS:
        raise StateFormatError(f"state claims {count} components (cap {MAX_COMPONENTS})")
    prefixes = None if understood is None else tuple(understood)
    components: dict[str, Component] = {}
    pos = 0
    for _ in range(count):
        if pos + ENTRY.size > len(body):
            raise StateFormatError("state body ends inside a component header")
        name_len, flags, payload_len = ENTRY.unpack_from(body, pos)
        pos += ENTRY.size
        if name_len == 0 or name_len > MAX_NAME_BYTES or pos + name_len + payload_len > len(body):
            raise StateFormatError("state component overruns the body")
        try:
            name = body[pos : pos + name_len].decode()
        except UnicodeDecodeError:
            raise StateFormatError("state component name is not UTF-8") from None
        pos += name_len
        payload = body[pos : pos + payload_len]
        pos += payload_len
        required = bool(flags & REQUIRED)
        if name in components:
            raise StateFormatError(f"state component {name!r} appears twice")
        if prefixes is not None and not name.startswith(prefixes):
            if required:
                raise StateFormatError(
                    f"the saved state needs component {name!r}, which this VMM does not "
                    "understand (it was written by a newer intrahost)"
                )
            continue
        components[name] = Component(name, payload, required)
    if pos != len(body):
        raise StateFormatError(f"{len(body) - pos} stray bytes after the last component")
    return State(minor, components)


__all__ = [
    "Component",
    "State",
    "StateFormatError",
    "decode",
    "encode",
    "encode_entries",
    "entry_name",
    "json_payload",
]
