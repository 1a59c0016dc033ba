"""The model platform's wire protocol: framed JSON with binary blobs and passed fds.

One frame on an ``AF_UNIX`` stream socket::

    header   struct "<4sIII": magic b"IHSM", JSON length, blob section length, fd count
    body     JSON (UTF-8), then the blob section
    fds      SCM_RIGHTS ancillary data of the same sendmsg (at most MAX_FDS)

Inside the JSON, every ``bytes`` value is replaced by ``{"$blob": [offset, length]}`` into the
blob section, so raw guest data and VMSAs travel without base64. Requests are
``{"id": n, "op": name, "args": {...}}``; replies ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "errno": e, "firmware_error": code-or-null, "detail": text}``.
Which fds a message carries is part of each operation's definition (``service.py``).

No pickle: a malformed frame is answered with an error (or, if it cannot even be framed, the
connection is closed); it cannot make the service run code.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from intrahost.errors import IntrahostError

MAGIC = b"IHSM"
HEADER = struct.Struct("<4sIII")
MAX_JSON = 1 << 20
MAX_BLOBS = 1 << 30
MAX_FDS = 8
PROTOCOL_VERSION = 1


class ProtocolError(IntrahostError):
    """A frame could not be read or written."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (cleanly, between frames)."""


class MalformedMessage(ProtocolError):
    """A whole frame arrived but its body is not valid; the stream is still in sync."""


@dataclass
class Message:
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)


def _encode(value: Any, blobs: list[bytes], offset: list[int]) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        blobs.append(data)
        start = offset[0]
        offset[0] += len(data)
        return {"$blob": [start, len(data)]}
    if isinstance(value, dict):
        return {str(k): _encode(v, blobs, offset) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, blobs, offset) for v in value]
    return value


def _decode(value: Any, section: bytes) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$blob"}:
            start, length = value["$blob"]
            if not (isinstance(start, int) and isinstance(length, int)):
                raise MalformedMessage("malformed blob reference")
            if start < 0 or length < 0 or start + length > len(section):
                raise MalformedMessage("blob reference outside the blob section")
            return section[start : start + length]
        return {k: _decode(v, section) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, section) for v in value]
    return value


def encode(body: dict[str, Any]) -> tuple[bytes, bytes]:
    """The JSON text and blob section for a message body."""
    blobs: list[bytes] = []
    text = json.dumps(_encode(body, blobs, [0]), separators=(",", ":")).encode()
    return text, b"".join(blobs)


def send_message(sock: socket.socket, body: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one frame (the caller serialises concurrent senders)."""
    fds = fds or []
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"at most {MAX_FDS} fds per message")
    text, section = encode(body)
    header = HEADER.pack(MAGIC, len(text), len(section), len(fds))
    payload = header + text + section
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    try:
        sent = sock.sendmsg([payload], ancillary)
        if sent < len(payload):
            sock.sendall(payload[sent:])
    except OSError as err:
        raise ProtocolError(f"could not send to the platform service: {err}") from err


def _recv_exact(sock: socket.socket, length: int) -> bytes:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = sock.recv_into(view[got:], length - got)
        if n == 0:
            raise ProtocolError("connection closed in the middle of a frame")
        got += n
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Receive one frame; fds arrive close-on-exec and belong to the caller."""
    fds = array.array("i")
    try:
        data, ancdata, flags, _addr = sock.recvmsg(
            HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
    except OSError as err:
        raise ProtocolError(f"could not receive: {err}") from err
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - (len(cdata) % fds.itemsize)
            fds.frombytes(cdata[:usable])
    received = list(fds)
    try:
        if not data:
            raise ConnectionClosed("the peer closed the connection")
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many fds in one message")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        magic, json_len, blob_len, nfds = HEADER.unpack(data)
        if magic != MAGIC:
            raise ProtocolError("not an intrahost platform frame (bad magic)")
        if json_len > MAX_JSON or blob_len > MAX_BLOBS:
            raise ProtocolError("frame too large")
        if nfds != len(received):
            raise ProtocolError(f"frame announces {nfds} fds, {len(received)} arrived")
        text = _recv_exact(sock, json_len)
        section = _recv_exact(sock, blob_len)
        try:
            body = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedMessage(f"frame is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise MalformedMessage("frame body is not a JSON object")
        return Message(_decode(body, section), received)
    except BaseException:
        for fd in received:
            os.close(fd)
        raise


def default_socket_path() -> str:
    """Where the model platform service listens by default.

    ``$XDG_RUNTIME_DIR/intrahost/sev-model.sock``; without XDG_RUNTIME_DIR,
    ``/run/intrahost/sev-model.sock`` for root and ``/tmp/intrahost-<uid>/sev-model.sock``
    otherwise. ``INTRAHOST_SEV_MODEL_SOCKET`` overrides all of them.
    """
    explicit = os.environ.get("INTRAHOST_SEV_MODEL_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "intrahost", "sev-model.sock")
    if os.geteuid() == 0:
        return "/run/intrahost/sev-model.sock"
    return f"/tmp/intrahost-{os.geteuid()}/sev-model.sock"


def ensure_private_dir(path: str) -> None:
    """Create ``path`` mode 0700 (or check an existing one is ours and private)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise ProtocolError(
            f"{path} belongs to uid {st.st_uid}, not to you; choose another socket path"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
