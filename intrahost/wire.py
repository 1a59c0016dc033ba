"""Frames with file descriptors on a unix stream socket: the framing both protocols share.

The hand-off protocol between two VMMs (:mod:`intrahost.migration.protocol`) and the SEV model
platform's service protocol (:mod:`intrahost.sevmodel.protocol`) both send *frames*: a
fixed-size header, defined by the protocol, that announces the payload's length and how many
fds travel with the frame; then the payload. The fds are SCM_RIGHTS ancillary data of the
``sendmsg`` that carries the header. A :class:`Framing` is one protocol's layout and limits;
the message kinds and what a payload means are the protocol's business.

Receiving follows this order, so that a hostile or broken peer costs little:

1. the header (the fds arrive with it; more than the protocol's cap breaks the connection);
2. the protocol reads the lengths and the fd count out of the header; a header that is not one
   of its frames breaks the connection;
3. the announced length is checked against the cap *before* the payload is read, and the
   announced fd count against the fds that arrived;
4. the payload, read as it arrives (nothing is allocated for bytes the peer only announced).

Every read is bounded by one deadline for the whole frame when the caller gives a timeout.
Received fds are close-on-exec; they are closed again if the frame fails at any step, and
belong to the caller once the frame is returned.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from intrahost.errors import IntrahostError

#: The most bytes one ``recvmsg`` asks for: the payload is read in chunks as it arrives.
CHUNK = 1 << 20
_FD_SIZE = array.array("i").itemsize


class ProtocolError(IntrahostError):
    """A peer broke a protocol: its connection failed, or it sent what the protocol forbids."""


class ConnectionBroken(ProtocolError):
    """The connection cannot carry another frame: the peer went away, did not answer in
    time, or sent bytes that are not a frame of the protocol."""


class ConnectionClosed(ConnectionBroken):
    """The peer closed the connection between two frames (an orderly end, not an error of
    the stream)."""


class PayloadError(ProtocolError):
    """A whole frame arrived but its payload is not what the protocol allows; the stream is
    still in sync, so the receiver can answer with an error and read the next frame."""


@dataclass
class Frame:
    """A received frame: the unpacked header fields, the payload and the fds (the caller's,
    to close)."""

    header: tuple[Any, ...]
    payload: bytes
    fds: list[int] = field(default_factory=list)


#: From a protocol's unpacked header: (payload length, fd count). Raises
#: :class:`ConnectionBroken` for a header that is not one of the protocol's frames.
Announced = Callable[[tuple[Any, ...]], tuple[int, int]]


@dataclass(frozen=True)
class Framing:
    """One protocol's frame layout: its ``header`` struct, what the header announces, and
    the caps on payload length and fds per frame."""

    header: struct.Struct
    announced: Announced
    max_payload: int
    max_fds: int

    def check(self, payload: bytes, fds: Sequence[int]) -> None:
        """Refuse a frame that is over the caps, before anything of it is sent."""
        if len(payload) > self.max_payload or len(fds) > self.max_fds:
            raise ProtocolError(
                f"a frame of {len(payload)} bytes and {len(fds)} fds is too large (caps "
                f"{self.max_payload} bytes, {self.max_fds} fds)"
            )

    def send(
        self,
        sock: socket.socket,
        header: tuple[Any, ...],
        payload: bytes = b"",
        fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> None:
        """Send one frame, its fds with the header. ``timeout`` (seconds) bounds the whole
        send; ``None`` leaves the socket's own timeout as it is (callers that share a socket
        between threads serialise their senders and keep it blocking)."""
        self.check(payload, fds)
        head = self.header.pack(*header)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            sent = sock.sendmsg([head, payload], ancillary)
            if sent < len(head):
                sock.sendall(head[sent:])
                sent = len(head)
            if sent - len(head) < len(payload):
                sock.sendall(memoryview(payload)[sent - len(head) :])
        except TimeoutError:
            raise ConnectionBroken("timed out sending to the peer") from None
        except OSError as e:
            raise ConnectionBroken(f"connection lost while sending: {e.strerror or e}") from None

    def receive(self, sock: socket.socket, timeout: float | None = None) -> Frame:
        """Receive one frame, in the order of the module docstring. ``timeout`` (seconds)
        bounds the whole frame; ``None`` waits as long as the socket does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fds: list[int] = []
        try:
            head = self._recv_exact(sock, self.header.size, fds, deadline, frame_start=True)
            fields = self.header.unpack(head)
            length, nfds = self.announced(fields)
            if length > self.max_payload:
                raise ConnectionBroken(
                    f"the peer announced a {length}-byte message (cap {self.max_payload})"
                )
            if nfds != len(fds):
                raise ConnectionBroken(f"the peer announced {nfds} fds and sent {len(fds)}")
            payload = self._recv_exact(sock, length, fds, deadline) if length else b""
            if nfds != len(fds):
                raise ConnectionBroken(f"the peer announced {nfds} fds and sent {len(fds)}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Frame(fields, payload, fds)

    def _recv_exact(
        self,
        sock: socket.socket,
        n: int,
        fds: list[int],
        deadline: float | None,
        frame_start: bool = False,
    ) -> bytes:
        """Exactly ``n`` bytes; fds that arrive on the way are appended to ``fds``."""
        chunks: list[bytes] = []
        got = 0
        fd_space = socket.CMSG_SPACE(self.max_fds * _FD_SIZE)
        while got < n:
            try:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                data, ancdata, flags, _ = sock.recvmsg(
                    min(n - got, CHUNK), fd_space, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                raise ConnectionBroken("timed out waiting for the peer") from None
            except OSError as e:
                raise ConnectionBroken(f"connection lost: {e.strerror or e}") from None
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(blob[: len(blob) - len(blob) % _FD_SIZE])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise ConnectionBroken(
                    f"the peer sent more fds with one frame than the {self.max_fds} allowed"
                )
            if not data:
                if frame_start and got == 0:
                    raise ConnectionClosed("the peer closed the connection")
                raise ConnectionBroken("the peer closed the connection in the middle of a frame")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)
