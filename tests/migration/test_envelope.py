"""The saved-state envelope: round trip, versioning, compatibility and refusals."""

from __future__ import annotations

import struct
import zlib

import pytest

from intrahost.migration import envelope
from intrahost.migration.envelope import Component, StateFormatError, decode, encode


def _sample() -> list[Component]:
    return [
        Component("config", envelope.json_payload({"vcpus": 1})),
        Component("vcpu/0/regs", bytes(range(144))),
        Component("device/uart", b"{}", required=False),
    ]


def test_round_trip() -> None:
    state = decode(encode(_sample()))
    assert state.need("vcpu/0/regs") == bytes(range(144))
    assert state.need_json("config") == {"vcpus": 1}
    assert state.names("vcpu/") == ["vcpu/0/regs"]
    assert state.minor == envelope.MINOR


def test_a_newer_writer_is_read_by_an_older_reader() -> None:
    """Rollback: extra optional components and a higher minor are ignored."""
    data = encode([*_sample(), Component("gpu/0", b"new", required=False)], minor=99)
    state = decode(data, understood=("config", "vcpu/", "device/"))
    assert state.minor == 99
    assert state.get("gpu/0") is None
    assert state.need("vcpu/0/regs")


def test_an_unknown_required_component_is_refused_by_name() -> None:
    data = encode([*_sample(), Component("gpu/0", b"new", required=True)])
    with pytest.raises(StateFormatError, match="gpu/0"):
        decode(data, understood=("config", "vcpu/", "device/"))


def test_a_missing_component_is_named() -> None:
    state = decode(encode(_sample()))
    with pytest.raises(StateFormatError, match="vcpu/1/regs"):
        state.need("vcpu/1/regs")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
        (lambda d: d[:8] + struct.pack("<H", 2) + d[10:], "container format 2"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: d[:-3], "header says"),
        (lambda d: d[:10], "shorter than its header"),
    ],
    ids=["magic", "major", "checksum", "truncated", "header"],
)
def test_corruption_is_refused(mutate: object, message: str) -> None:
    data = encode(_sample())
    with pytest.raises(StateFormatError, match=message):
        decode(mutate(data))  # type: ignore[operator]


def test_component_overrun_is_refused_even_with_a_valid_checksum() -> None:
    body = struct.pack("<HHI", 6, 1, 1 << 20) + b"config"
    header = envelope.HEADER.pack(envelope.MAGIC, envelope.MAJOR, 1, 1, len(body), zlib.crc32(body))
    with pytest.raises(StateFormatError, match="overruns"):
        decode(header + body)


def test_size_cap() -> None:
    with pytest.raises(StateFormatError, match="exceeds"):
        decode(b"\0" * (envelope.MAX_STATE_BYTES + 1))
