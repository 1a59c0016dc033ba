"""intrahost.wire: the framing both protocols share (header, caps, fds, deadline, errors)."""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from intrahost import wire

HEADER = struct.Struct("<IH")  # payload length, fd count


def _announced(header: tuple[Any, ...]) -> tuple[int, int]:
    length, nfds = header
    return length, nfds


FRAMING = wire.Framing(HEADER, _announced, max_payload=1 << 16, max_fds=2)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def test_round_trip_with_fds_close_on_exec(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        FRAMING.send(a, (5, 1), b"hello", [r])
        frame = FRAMING.receive(b, timeout=5)
        assert (frame.header, frame.payload, len(frame.fds)) == ((5, 1), b"hello", 1)
        assert os.fstat(frame.fds[0]).st_ino == os.fstat(r).st_ino
        assert not os.get_inheritable(frame.fds[0])
        os.close(frame.fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_closed_between_frames_and_in_the_middle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(HEADER.pack(10, 0) + b"abc")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(wire.ConnectionBroken) as info:
        FRAMING.receive(b, timeout=5)
    assert not isinstance(info.value, wire.ConnectionClosed)
    with pytest.raises(wire.ConnectionClosed):
        FRAMING.receive(b, timeout=5)


def test_a_payload_over_the_cap_breaks_before_it_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(HEADER.pack(1 << 30, 0))  # announced, never sent
    with pytest.raises(wire.ConnectionBroken, match="cap"):
        FRAMING.receive(b, timeout=5)
    with pytest.raises(wire.ProtocolError):
        FRAMING.send(a, (0, 0), bytes((1 << 16) + 1))


def test_fds_are_closed_when_the_frame_fails(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        before = _open_fds()
        _send_raw(a, HEADER.pack(0, 2), [r])  # announces two, carries one
        with pytest.raises(wire.ConnectionBroken, match="announced 2 fds"):
            FRAMING.receive(b, timeout=5)
        _send_raw(a, HEADER.pack(0, 3), [r, r, r])  # over the cap: truncated by the kernel
        with pytest.raises(wire.ConnectionBroken, match="more fds"):
            FRAMING.receive(b, timeout=5)
        assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_one_deadline_for_the_whole_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        before = _open_fds()
        _send_raw(a, HEADER.pack(4, 1) + b"ab", [r])  # the rest never comes
        start = time.monotonic()
        with pytest.raises(wire.ConnectionBroken, match="timed out"):
            FRAMING.receive(b, timeout=0.2)
        assert time.monotonic() - start < 5
        assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)
