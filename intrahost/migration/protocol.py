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

Versions are negotiated at START (see :func:`start_offer`, :func:`choose`, :func:`agreed`):
the source offers the range of protocol versions it speaks, the destination answers with the
newest version both speak, or refuses naming both ranges; both sides then speak that version,
and the source writes the state in that version's format (``intrahost.migration.state``). A
peer that does not negotiate (v0.1.0) sends or reads only ``"version"``.

Ownership of the guest is decided by a *baton*: a tiny shared file (a memfd) that the source
creates and sends with START. It holds one word: PENDING, COMMITTED or ABANDONED, changed only
by compare-and-swap under an open-file-description lock (see :class:`Baton`; dropped when
the holder dies). The destination swaps PENDING -> COMMITTED before it runs the guest — once
it imported the state of a STATE_COMMIT, on COMMIT, or on its own when the source went silent
after the whole state was imported (in the two-step sequence, STATE then COMMIT): that
swap is the **commit point**. A source that loses contact swaps PENDING -> ABANDONED before
it resumes the guest. Exactly one of the two swaps succeeds, so the guest never runs on two
VMMs, and a source that cannot tell whether its COMMIT arrived learns it from the baton.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import intrahost
from intrahost.errors import IntrahostError
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.wire import ConnectionBroken as ConnectionBroken
from intrahost.wire import Framing
from intrahost.wire import PayloadError as PayloadError
from intrahost.wire import ProtocolError as ProtocolError

#: The newest protocol version this VMM speaks, and the oldest it still speaks (to an older
#: peer: a rollback is a hand-off to the previous release). See :func:`start_offer`.
PROTOCOL_VERSION = 1
OLDEST_PROTOCOL_VERSION = 1

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
    #: A pty console's master side, so the guest keeps its terminal: sent only to a
    #: destination whose START reply lists the feature :data:`CONSOLE_FD_FEATURE`.
    CONSOLE_FD = 10
    #: One virtio device's host fds — a disk's open image, its irqfd and ioeventfd eventfds —
    #: named in the payload ``{"device": N, "names": [...]}`` in the order they travel; sent
    #: only to a destination whose START reply lists :data:`DEVICE_FDS_FEATURE`.
    DEVICE_FDS = 11
    #: STATE and COMMIT in one message (both sides named :data:`COMMIT_WITH_STATE`).
    STATE_COMMIT = 12


#: The START reply's ``features`` name what a destination accepts beyond its protocol
#: version; a sender uses a feature only if it is listed (older destinations list none).
CONSOLE_FD_FEATURE = "console-fd"
DEVICE_FDS_FEATURE = "device-fds"
#: A feature both sides must name: the source in START's own ``features``, the destination
#: in its reply (only if the source named it). The destination then commits as soon as the
#: state is imported, on STATE_COMMIT, saving COMMIT's round trip in the blackout. A peer
#: that does not name it (intrahost 0.1) gets, or sends, STATE, then COMMIT.
COMMIT_WITH_STATE = "commit-with-state"


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


def _announced(header: tuple[Any, ...]) -> tuple[int, int]:
    _kind, nfds, _reserved, length = header
    return length, nfds


#: Requests and responses alike: the header is :data:`FRAME` (see the module docstring).
FRAMING = Framing(FRAME, _announced, max_payload=MAX_PAYLOAD, max_fds=MAX_FDS)


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


# --- version negotiation -----------------------------------------------------------------------


class NoCommonVersion(ProtocolError):
    """The two VMMs speak no protocol version in common (the message names both ranges)."""


@dataclass(frozen=True)
class VersionRange:
    """Protocol versions ``low`` to ``high``, both included."""

    low: int
    high: int

    def __contains__(self, version: object) -> bool:
        return type(version) is int and self.low <= version <= self.high

    def __str__(self) -> str:
        if self.low == self.high:
            return f"protocol version {self.low}"
        return f"protocol versions {self.low} to {self.high}"


def spoken() -> VersionRange:
    """The protocol versions this VMM speaks."""
    return VersionRange(OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION)


def start_offer() -> dict[str, Any]:
    """The version keys of the source's START: ``versions``, the range it speaks, and
    ``version``, the version it speaks with a destination that does not negotiate: v0.1.0
    reads only ``version``, accepts its own (1) and answers with it, so this is the oldest
    version this side speaks (an old destination then refuses it by naming both)."""
    versions = spoken()
    return {"version": versions.low, "versions": [versions.low, versions.high]}


def offered(body: Mapping[str, Any]) -> VersionRange:
    """The destination's reading of the range a START offers (a START without ``versions``,
    from v0.1.0, offers exactly its ``version``). Raises PayloadError if it is malformed."""
    version = body.get("version")
    if type(version) is not int or version < 1:
        raise PayloadError(f"'version' {version!r} is not a protocol version")
    versions = body.get("versions", [version, version])
    if (
        not isinstance(versions, list)
        or len(versions) != 2
        or not all(type(v) is int for v in versions)
        or not 1 <= versions[0] <= versions[1]
    ):
        raise PayloadError(f"'versions' {versions!r} is not a range [oldest, newest]")
    offer = VersionRange(versions[0], versions[1])
    if version not in offer:
        raise PayloadError(f"'version' {version} lies outside the offered {offer}")
    return offer


def choose(offer: VersionRange) -> int:
    """The destination's choice: the newest version both sides speak. Raises
    NoCommonVersion naming both ranges."""
    mine = spoken()
    chosen = min(offer.high, mine.high)
    if chosen < max(offer.low, mine.low):
        verb = "is" if offer.low == offer.high else "are"
        raise NoCommonVersion(
            f"{offer} {verb} not accepted; this VMM (intrahost {intrahost.__version__}) "
            f"speaks {mine}"
        )
    return chosen


def agreed(reply: Mapping[str, Any], offer: VersionRange) -> int:
    """The source's reading of the destination's answer to START: the version it chose
    (an answer without one means the ``version`` START named, the oldest offered). Raises
    NoCommonVersion if it is not one this side offered: the hand-off stops before the pause.
    """
    chosen = reply.get("version", offer.low)
    if chosen not in offer:
        raise NoCommonVersion(
            f"the destination chose protocol version {chosen!r}; this VMM (intrahost "
            f"{intrahost.__version__}) speaks {offer}"
        )
    return int(chosen)


# --- messages ----------------------------------------------------------------------------------


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
    """One end of a migration connection: framed send/receive with fds and deadlines
    (:data:`FRAMING`, read and written by :mod:`intrahost.wire`)."""

    def __init__(
        self, sock: socket.socket, timeout: float = 10.0, faults: Faults = NO_FAULTS
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        #: Injects the fault tests' truncated or corrupted frames (none by default).
        self.faults = faults

    def close(self) -> None:
        self.sock.close()

    def send(
        self, kind: int, payload: bytes = b"", fds: Sequence[int] = (), timeout: float | None = None
    ) -> None:
        FRAMING.check(payload, fds)
        injected = self.faults.frame_fault()
        if injected == "corrupt" and payload:
            payload = payload[:-1] + bytes([payload[-1] ^ 0x5A])
        timeout = self.timeout if timeout is None else timeout
        if injected == "truncate":
            header = FRAME.pack(kind, len(fds), 0, len(payload))
            try:
                self.sock.settimeout(timeout)
                self.sock.sendall((header + payload)[: (FRAME.size + len(payload)) // 2])
            except OSError as e:
                raise ConnectionBroken(f"connection lost while sending: {e}") from None
            finally:
                self.sock.close()
            raise ConnectionBroken("fault injected: truncated frame")
        FRAMING.send(self.sock, (kind, len(fds), 0, len(payload)), payload, fds, timeout)

    def receive(self, timeout: float | None = None) -> Message:
        """One message; its fds are owned by the caller (close them if unexpected)."""
        frame = FRAMING.receive(self.sock, self.timeout if timeout is None else timeout)
        return Message(frame.header[0], frame.payload, frame.fds)

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


def release_name(value: object) -> str:
    """How a peer's release (START's and its reply's ``release``) reads in a log line; peers
    of releases that predate that key send none."""
    if isinstance(value, str) and value:
        return f"intrahost {value}"
    return "an intrahost release that does not report its version"


def parse_url(url: str) -> str:
    """``unix:PATH`` -> PATH (the only transport: fds cross only unix sockets)."""
    scheme, sep, path = url.partition(":")
    if not sep or scheme != "unix" or not path:
        raise ProtocolError(
            f"unsupported migration URL {url!r}: use unix:PATH (guest memory and, for SEV, the "
            "VM fd cross only a unix socket)"
        )
    return path
