"""The hand-off wire protocol: framed messages on a unix stream socket, fds with SCM_RIGHTS.

Every message goes from the source (the VMM that runs the guest) to the destination (the new
VMM) and is answered by exactly one response::

    request   command u16 | fd count u16 | reserved u32 | payload length u64 | payload
    response  status  u16 | fd count u16 | reserved u32 | payload length u64 | payload

Payloads are JSON objects, except STATE's, which is a saved-state envelope
(:mod:`intrahost.migration.envelope`). An error response carries ``{"error": text}``.
File descriptors travel in the ancillary data of the sendmsg that carries the header.

The order, and what the destination does on each message, is in
:mod:`intrahost.migration.receiver`; the source's side, with the pause and the commit point,
is in :mod:`intrahost.migration.sender`.

Ownership of the guest is decided by a *baton*: a tiny shared file (a memfd) that the source
creates and sends with START. It holds one word: PENDING, COMMITTED or ABANDONED, changed only
by compare-and-swap under an open-file-description lock (see :class:`Baton`; dropped when
the holder dies). The destination swaps PENDING -> COMMITTED before it runs the guest — on
COMMIT, or on its own when the source went silent after the whole state was imported: that
swap is the **commit point**. A source that loses contact swaps PENDING -> ABANDONED before
it resumes the guest. Exactly one of the two swaps succeeds, so the guest never runs on two
VMMs, and a source that cannot tell whether its COMMIT arrived learns it from the baton.
"""

from __future__ import annotations

import array
import contextlib
import enum
import fcntl
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.migration import faults

PROTOCOL_VERSION = 1
#: Versions this VMM accepts from a sender: its own and the previous one (once there is one).
ACCEPTED_VERSIONS = frozenset(v for v in (PROTOCOL_VERSION, PROTOCOL_VERSION - 1) if v >= 1)

#: Seconds to wait for each answer; INTRAHOST_MIGRATION_TIMEOUT overrides it (the fault
#: tests shorten it).
DEFAULT_TIMEOUT = float(os.environ.get("INTRAHOST_MIGRATION_TIMEOUT", "10"))

FRAME = struct.Struct("<HHIQ")
MAX_PAYLOAD = 64 << 20
MAX_FDS = 16


class Command(enum.IntEnum):
    START = 1
    MEMORY_FD = 2
    CONFIG = 3
    READY = 4
    STATE = 5
    COMMIT = 6
    ABANDON = 7
    #: Copy-based baseline only: a chunk of guest memory sent through the socket.
    MEMORY_DATA = 8
    #: SEV guests: the source's VM (its fd, for KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM).
    SEV_CONTEXT = 9


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class ProtocolError(IntrahostError):
    """The peer broke the protocol, went away, or did not answer in time."""


class PayloadError(ProtocolError):
    """A complete message whose payload is not the JSON object it must be: the receiver
    refuses it with an error reply (unlike a broken connection, which it cannot answer)."""


class PeerRefused(IntrahostError):
    """The destination answered a request with an error (it says why). ``body`` is the
    reply's JSON and ``fds`` the fds it carried (the catcher owns and closes them)."""

    def __init__(self, text: str, body: dict[str, Any] | None = None, fds: list[int] | None = None):
        super().__init__(text)
        self.body = body or {}
        self.fds = fds or []

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass
class Message:
    kind: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        if not self.payload:
            return {}
        try:
            value = json.loads(self.payload)
        except RecursionError:
            raise PayloadError("message payload nests too deeply") from None
        except ValueError as e:  # not UTF-8, not JSON, or a number of over 4300 digits
            raise PayloadError(f"message payload is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise PayloadError("message payload is not a JSON object")
        return value

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def to_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Channel:
    """One end of a migration connection: framed send/receive with fds and deadlines."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout

    def close(self) -> None:
        self.sock.close()

    def send(
        self, kind: int, payload: bytes = b"", fds: Sequence[int] = (), timeout: float | None = None
    ) -> None:
        if len(payload) > MAX_PAYLOAD or len(fds) > MAX_FDS:
            raise ProtocolError(f"message of {len(payload)} bytes / {len(fds)} fds is too large")
        header = FRAME.pack(kind, len(fds), 0, len(payload))
        injected = faults.take_frame_fault(("truncate", "corrupt"))
        if injected == "corrupt" and payload:
            payload = payload[:-1] + bytes([payload[-1] ^ 0x5A])
        try:
            self.sock.settimeout(self.timeout if timeout is None else timeout)
            if injected == "truncate":
                self.sock.sendall((header + payload)[: (FRAME.size + len(payload)) // 2])
                self.sock.close()
                raise ProtocolError("fault injected: truncated frame")
            ancillary = []
            if fds:
                ancillary = [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                ]
            sent = self.sock.sendmsg([header, payload], ancillary)
            if sent < FRAME.size + len(payload):
                self.sock.sendall((header + payload)[sent:])
        except TimeoutError:
            raise ProtocolError("timed out sending to the peer") from None
        except OSError as e:
            raise ProtocolError(f"connection lost while sending: {e.strerror or e}") from None

    def receive(self, timeout: float | None = None) -> Message:
        """One message; its fds are owned by the caller (close them if unexpected)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        try:
            header = self._recv_exact(FRAME.size, deadline, fds)
            kind, nfds, _reserved, length = FRAME.unpack(header)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"peer announced a {length}-byte message (cap {MAX_PAYLOAD})")
            if nfds != len(fds):
                raise ProtocolError(f"peer announced {nfds} fds and sent {len(fds)}")
            payload = self._recv_exact(length, deadline, fds) if length else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(kind, payload, fds)

    def _recv_exact(self, n: int, deadline: float, fds: list[int]) -> bytes:
        chunks: list[bytes] = []
        got = 0
        fd_space = socket.CMSG_SPACE(MAX_FDS * 4)
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("timed out waiting for the peer")
            try:
                self.sock.settimeout(left)
                data, ancdata, flags, _ = self.sock.recvmsg(min(n - got, 1 << 20), fd_space)
            except TimeoutError:
                raise ProtocolError("timed out waiting for the peer") from None
            except OSError as e:
                raise ProtocolError(f"connection lost: {e.strerror or e}") from None
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
                    fds.extend(arr)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("peer sent more fds than a message may carry")
            if not data:
                raise ProtocolError("the peer closed the connection")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    # --- request / response (source side) ------------------------------------------------------

    def request(
        self,
        kind: Command,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its response; raise PeerRefused on an error status."""
        self.send(kind, payload, fds)
        reply = self.receive(timeout)
        try:
            body = reply.json()
        except ProtocolError:
            reply.close_fds()
            raise
        if reply.kind == Status.ERROR:
            text = str(body.get("error", "the destination refused"))
            raise PeerRefused(text, body, reply.fds)
        reply.close_fds()
        if reply.kind == Status.OK:
            return body
        raise ProtocolError(f"unknown response status {reply.kind}")

    # --- responses (destination side) ----------------------------------------------------------

    def ok(self, body: dict[str, Any] | None = None) -> None:
        self.send(Status.OK, to_json(body or {}))

    def error(self, text: str) -> None:
        self.send(Status.ERROR, to_json({"error": text}))


# --- the baton ---------------------------------------------------------------------------------


class Baton:
    """Who owns the guest: PENDING (the source), COMMITTED (the destination), ABANDONED
    (the hand-off failed; the source). See the module docstring.

    Locking. Every swap holds an exclusive open-file-description (OFD) lock on the word. The
    lock is taken on a descriptor this object opens for itself (``/proc/self/fd/N`` re-opened):
    OFD locks belong to an open file description, and the descriptors that SCM_RIGHTS (or
    ``dup``) hands around all share the sender's, so locking :attr:`fd` itself would let
    the two sides of a hand-off in one process both hold the lock. A POSIX ``lockf`` lock
    would not do either: it belongs to the process, so two threads both take it. The private
    description is never passed on, so the kernel drops its lock when this object closes it
    or the process dies.
    """

    PENDING = 0
    COMMITTED = 1
    ABANDONED = 2
    _WORD = struct.Struct("<Q")
    #: ``struct flock`` on Linux x86-64: type, whence, start, length, pid (0 for OFD locks).
    _FLOCK = struct.Struct("@hhqqi4x")

    def __init__(self, fd: int) -> None:
        """Use the baton open at ``fd`` (owned and closed by this object)."""
        self.fd = fd
        self._lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    @classmethod
    def create(cls) -> Baton:
        fd = os.memfd_create("intrahost-baton", os.MFD_CLOEXEC)
        try:
            os.pwrite(fd, cls._WORD.pack(cls.PENDING), 0)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def read(self) -> int:
        data = os.pread(self._lock_fd, self._WORD.size, 0)
        return int(self._WORD.unpack(data)[0]) if len(data) == self._WORD.size else -1

    @classmethod
    def adopt(cls, fd: int) -> Baton:
        """The baton a peer sent: refuse (and close) anything but a writable, unsealed,
        8-byte regular file (the memfd the source created)."""
        try:
            st = os.fstat(fd)
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            try:
                sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
            except OSError:  # not a memfd: no seals
                sealed = 0
        except OSError as e:
            os.close(fd)
            raise PayloadError(f"the baton fd cannot be examined: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != cls._WORD.size or not writable or sealed:
            os.close(fd)
            raise PayloadError(
                "the baton must be the writable 8-byte memfd the source created with START"
            )
        try:
            return cls(fd)
        except OSError as e:
            os.close(fd)
            raise PayloadError(f"the baton fd cannot be re-opened: {e.strerror}") from None

    def _set_lock(self, lock_type: int) -> bool:
        """Take (F_WRLCK) or drop (F_UNLCK) the OFD lock on the word without waiting; False
        if another open file description holds it."""
        request = self._FLOCK.pack(lock_type, os.SEEK_SET, 0, self._WORD.size, 0)
        try:
            fcntl.fcntl(self._lock_fd, fcntl.F_OFD_SETLK, request)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held elsewhere
            return False
        return True

    @contextlib.contextmanager
    def locked(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
        """Hold the baton's lock. Raises ProtocolError if it stays taken for ``timeout``
        seconds (a stopped peer)."""
        deadline = time.monotonic() + timeout
        while not self._set_lock(fcntl.F_WRLCK):
            if time.monotonic() > deadline:
                raise ProtocolError("the baton stayed locked by the peer")
            time.sleep(0.001)
        try:
            yield
        finally:
            self._set_lock(fcntl.F_UNLCK)

    def swap(self, expected: int, new: int, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Compare-and-swap; returns the value found (== expected when it swapped). Raises
        ProtocolError if the lock stays taken for ``timeout`` seconds (a stopped peer)."""
        with self.locked(timeout):
            found = self.read()
            if found == expected:
                os.pwrite(self._lock_fd, self._WORD.pack(new), 0)
            return found

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_url(url: str) -> str:
    """``unix:PATH`` -> PATH (the only transport: fds cross only unix sockets)."""
    scheme, sep, path = url.partition(":")
    if not sep or scheme != "unix" or not path:
        raise ProtocolError(
            f"unsupported migration URL {url!r}: use unix:PATH (guest memory and, for SEV, the "
            "VM fd cross only a unix socket)"
        )
    return path
