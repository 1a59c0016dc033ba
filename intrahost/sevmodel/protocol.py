"""The model platform's wire protocol: framed JSON with binary blobs and passed fds.

One frame on an ``AF_UNIX`` stream socket::

    header   struct "<4sIII": magic b"IHSM", JSON length, blob section length, fd count
    body     JSON (UTF-8), then the blob section
    fds      SCM_RIGHTS ancillary data of the same sendmsg (at most MAX_FDS)

Frames are read and written by :mod:`intrahost.wire` (:data:`FRAMING`), with its order of
checks and its errors.

Inside the JSON, every ``bytes`` value is replaced by ``{"$blob": [offset, length]}`` into the
blob section, so raw guest data and VMSAs travel without base64. Requests are
``{"id": n, "op": name, "args": {...}}``; replies ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "errno": e, "firmware_error": code-or-null, "detail": text}``.
Which fds a message carries is part of each operation's definition (``service.py``).

No pickle: a malformed frame is answered with an error (or, if it cannot even be framed, the
connection is closed); it cannot make the service run code.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.wire import ConnectionBroken, Framing, PayloadError

MAGIC = b"IHSM"
HEADER = struct.Struct("<4sIII")
MAX_JSON = 1 << 20
MAX_BLOBS = 1 << 30
MAX_FDS = 8
PROTOCOL_VERSION = 2


class ServiceSocketError(IntrahostError):
    """The service's socket cannot be set up: its directory is not private to this user, or
    another service already listens on it."""


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
            ref = value["$blob"]
            if not (isinstance(ref, list) and len(ref) == 2 and all(type(n) is int for n in ref)):
                raise PayloadError("malformed blob reference: not [offset, length]")
            start, length = ref
            if start < 0 or length < 0 or start + length > len(section):
                raise PayloadError("blob reference outside the blob section")
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


def _announced(header: tuple[Any, ...]) -> tuple[int, int]:
    magic, json_len, blob_len, nfds = header
    if magic != MAGIC:
        raise ConnectionBroken("not an intrahost platform frame (bad magic)")
    if json_len > MAX_JSON or blob_len > MAX_BLOBS:
        raise ConnectionBroken("frame too large")
    return json_len + blob_len, nfds


#: Requests and replies alike (see the module docstring).
FRAMING = Framing(HEADER, _announced, max_payload=MAX_JSON + MAX_BLOBS, max_fds=MAX_FDS)


def send_message(sock: socket.socket, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one frame (the caller serialises concurrent senders)."""
    text, section = encode(body)
    FRAMING.send(sock, (MAGIC, len(text), len(section), len(fds)), text + section, fds)


def recv_message(sock: socket.socket) -> Message:
    """Receive one frame; fds arrive close-on-exec and belong to the caller.

    Raises :class:`~intrahost.wire.ConnectionClosed` when the peer closed the connection
    between frames, :class:`~intrahost.wire.PayloadError` for a whole frame whose body is not
    a valid message (its fds are closed), :class:`~intrahost.wire.ConnectionBroken` else.
    """
    frame = FRAMING.receive(sock)
    try:
        json_len = frame.header[1]
        text, section = frame.payload[:json_len], frame.payload[json_len:]
        try:
            body = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise PayloadError(f"frame is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise PayloadError("frame body is not a JSON object")
        try:
            return Message(_decode(body, section), frame.fds)
        except RecursionError:
            raise PayloadError("frame body nests too deeply") from None
    except BaseException:
        for fd in frame.fds:
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
        raise ServiceSocketError(
            f"{path} belongs to uid {st.st_uid}, not to you; choose another socket path"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
