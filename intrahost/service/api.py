"""The control socket: QMP-shaped JSON over a unix stream socket.

The wire format is QEMU's QMP, so QEMU's own clients (the ``qemu.qmp`` package, ``socat``)
can drive a VMM; docs/api.md is the reference. In short: the server greets, the client must
send ``qmp_capabilities`` first, then each request
``{"execute": NAME, "arguments": {...}, "id": ANY}`` gets one reply ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` (with the request's ``id``). Events
``{"event": NAME, "data": {...}, "timestamp": {...}}`` go to every negotiated client. Every
message the server sends is one line ending with CRLF. Requests are a JSON stream, as QEMU
reads them: a request ends where its outermost braces close, with or without a line end.

Threading. One server thread runs a ``selectors`` loop over the listening socket, every
client and a wake-up socket; all client sockets are non-blocking, so a client that connects
and never speaks (or never reads) only costs its own buffers, and cannot hold up anyone else.
Command handlers run on that server thread, one at a time: they must return quickly (a long
job such as a migration is started by its command and reported through a query command and
events, as QEMU does). :meth:`ApiServer.emit` may be called from any thread; events a handler
emits reach the clients before that handler's reply.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError
from intrahost.version import version, version_numbers

log = logging.getLogger(__name__)

#: Longest request accepted (bytes); a longer one gets an error and ends the session.
MAX_MESSAGE = 1 << 20

#: Unsent output one client may hold (bytes) before it is considered stuck and dropped.
MAX_OUTPUT = 8 << 20

#: Simultaneous connections; more are refused with an error line.
MAX_CLIENTS = 32

#: How long close() keeps trying to deliver replies and events already queued (seconds).
CLOSE_FLUSH_TIMEOUT = 1.0

#: The longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

#: Argument types a schema may name, with the names error messages use (QAPI's words).
ARG_TYPES: Mapping[type, str] = MappingProxyType(
    {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "array",
        dict: "object",
        object: "any",
    }
)

#: name -> (type, required). Types are those in ARG_TYPES; ``float`` also accepts integers.
Schema = Mapping[str, tuple[type, bool]]

#: Gets the validated arguments; returns a JSON-able value (None means ``{}``).
Handler = Callable[[dict[str, Any]], Any]

_CRLF = b"\r\n"


class ApiError(IntrahostError):
    """The control API server was misused (bad registration, event data, start order)."""


class ApiSocketError(ApiError):
    """The control socket cannot be created at the requested path."""


class CommandError(IntrahostError):
    """Raised by a command handler: the client gets ``{"error": {"class", "desc"}}``.

    ``desc`` should tell the client what to do, e.g. "the guest is already paused".
    """

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Command:
    """One entry of the command table."""

    name: str
    handler: Handler
    schema: Mapping[str, tuple[type, bool]]


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    number: int
    splitter: JsonStreamSplitter
    outbuf: bytearray = field(default_factory=bytearray)
    negotiated: bool = False
    closing: bool = False  # send what is queued, then hang up; read nothing more
    closed: bool = False


class _Reply(Exception):
    """Internal: abandon a request with an error reply."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def version_info() -> dict[str, Any]:
    """The ``version`` member of the greeting and of ``query-version``, in QMP's shape:
    ``qemu`` holds this release's numbers (QEMU clients expect that member)."""
    major, minor, micro = version_numbers()
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"intrahost {version()}",
    }


def _command(name: str, handler: Handler, schema: Schema | None) -> Command:
    """A command table entry; raises :class:`ApiError` for a bad name or schema."""
    if not isinstance(name, str) or not name:
        raise ApiError(f"command name must be a non-empty string, got {name!r}")
    if name == "qmp_capabilities":
        raise ApiError("'qmp_capabilities' is built into the server and cannot be replaced")
    spec = dict(schema or {})
    for arg, entry in spec.items():
        if (
            not isinstance(arg, str)
            or not isinstance(entry, tuple)
            or len(entry) != 2
            or entry[0] not in ARG_TYPES
            or not isinstance(entry[1], bool)
        ):
            raise ApiError(
                f"command {name!r}: schema entry {arg!r}: {entry!r} must be (type, required) "
                f"with a type among str, int, float, bool, list, dict, object"
            )
    return Command(name, handler, MappingProxyType(spec))


def check_arguments(schema: Schema, arguments: Mapping[str, Any]) -> None:
    """Raise :class:`CommandError` unless ``arguments`` match ``schema``."""
    for key, value in arguments.items():
        if key not in schema:
            raise CommandError(f"Parameter '{key}' is unexpected")
        expected, _required = schema[key]
        if not _has_type(value, expected):
            raise CommandError(f"Parameter '{key}' expects {ARG_TYPES[expected]}")
    for key, (_expected, required) in schema.items():
        if required and key not in arguments:
            raise CommandError(f"Parameter '{key}' is missing")


def _has_type(value: Any, expected: type) -> bool:
    if expected is object:
        return True
    if expected is bool:
        return type(value) is bool
    if expected is int:
        return type(value) is int
    if expected is float:
        return type(value) in (int, float)
    return isinstance(value, expected)


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=False).encode() + _CRLF


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Outside strings, inside a message: brackets and quotes change state; any byte that cannot
# appear in JSON outside a string (a lexical error, like QEMU's lexer reports) is garbage.
_IN_MESSAGE = re.compile(rb'[{}\[\]"]|[^ \t\r\n,:0-9+\-.eEtrufalsn]')
_IN_STRING = re.compile(rb'["\\]')
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
# After garbage, input is skipped up to a line end or the next '{' (which starts a message).
_RESYNC = re.compile(rb"[\n{]")


@dataclass(frozen=True)
class _Garbage:
    """Input that cannot start or continue a JSON object; it was skipped (see _RESYNC)."""

    desc: str


class _Oversized(Exception):
    pass


class JsonStreamSplitter:
    """Cuts a byte stream into JSON texts, as QEMU's JSON streamer does.

    A message ends where its outermost ``{...}`` (or ``[...]``) closes, so requests need no
    line ends (``qemu.qmp`` sends none) and may span lines. Bytes that cannot be JSON are
    reported once as :class:`_Garbage`, and input is skipped up to the next line end or
    ``{``, so both a human typing into ``socat`` and a streaming client can go on. A
    message over ``max_message`` bytes raises :class:`_Oversized`.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = 0  # first byte of the message being assembled (when depth > 0)
        self._depth = 0
        self._in_string = False
        self._skipping = False  # discarding garbage up to the next line end or '{'

    @property
    def pending(self) -> bool:
        """Whether a message has started but not ended."""
        return self._depth > 0

    def feed(self, data: bytes) -> list[bytes | _Garbage]:
        self._buf += data
        out: list[bytes | _Garbage] = []
        buf = self._buf
        while self._pos < len(buf):
            if self._skipping:
                match = _RESYNC.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                self._pos = match.start() + (buf[match.start()] == ord("\n"))
                self._skipping = False
            elif self._depth == 0:
                match = _NON_SPACE.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                i = match.start()
                if buf[i] in b"{[":
                    self._start, self._depth, self._pos = i, 1, i + 1
                else:
                    out.append(_Garbage(f"expected a JSON object, got {chr(buf[i])!r}"))
                    self._skipping, self._pos = True, i
            elif self._in_string:
                match = _IN_STRING.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                i = match.start()
                if buf[i] == ord("\\"):
                    if i + 1 >= len(buf):
                        self._pos = i  # the escaped byte has not arrived yet
                        break
                    self._pos = i + 2
                else:
                    self._in_string, self._pos = False, i + 1
            else:
                match = _IN_MESSAGE.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                i = match.start()
                byte = buf[i]
                self._pos = i + 1
                if byte in b"{[":
                    self._depth += 1
                elif byte in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(bytes(buf[self._start : i + 1]))
                elif byte == ord('"'):
                    self._in_string = True
                else:
                    out.append(_Garbage(f"invalid character {chr(byte)!r} in JSON"))
                    self._depth, self._skipping, self._pos = 0, True, i
            if self._depth and self._pos - self._start > self.max_message:
                raise _Oversized
        # Forget what has been consumed.
        keep = self._start if self._depth else self._pos
        del buf[:keep]
        self._pos -= keep
        self._start = 0
        if self._depth and len(buf) > self.max_message:
            raise _Oversized
        return out


class ApiServer(Closeable):
    """A QMP-shaped control socket at ``path``. See the module docstring for threading.

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_message: int = MAX_MESSAGE,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = os.fspath(path)
        self.max_message = max_message
        self.max_clients = max_clients
        self._commands: dict[str, Command] = {}
        self._commands_lock = threading.Lock()
        self._events: deque[bytes] = deque()
        self._events_lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._next_client = 0
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._state_lock = threading.Lock()
        self.register("query-version", lambda _args: version_info())
        self.register("query-commands", self._query_commands)

    # -- command table -------------------------------------------------------------------

    def register(self, name: str, handler: Handler, schema: Schema | None = None) -> None:
        """Add command ``name``; ``handler(arguments)`` runs on the server thread.

        ``schema`` maps each argument name to ``(type, required)`` with a type from
        :data:`ARG_TYPES`; arguments are checked against it before the handler runs, so the
        handler sees only known names with the right types. Raises :class:`ApiError` for a
        duplicate name or a bad schema.
        """
        command = _command(name, handler, schema)
        with self._commands_lock:
            if name in self._commands:
                raise ApiError(f"command {name!r} is already registered; unregister it first")
            self._commands[name] = command

    def replace_commands(self, table: Mapping[str, tuple[Handler, Schema]]) -> None:
        """Register each ``name: (handler, schema)`` of ``table``, replacing a command of
        the same name, all in one step: a request sees either the old table or the new one
        (a VMM that received its guest swaps its waiting commands for its running ones)."""
        entries = {name: _command(name, *entry) for name, entry in table.items()}
        with self._commands_lock:
            self._commands.update(entries)

    def unregister(self, name: str) -> None:
        """Remove command ``name`` (no error if it is absent)."""
        with self._commands_lock:
            self._commands.pop(name, None)

    @property
    def commands(self) -> tuple[str, ...]:
        """The registered command names (with ``qmp_capabilities``), sorted."""
        with self._commands_lock:
            return tuple(sorted({"qmp_capabilities", *self._commands}))

    def _query_commands(self, _args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.commands]

    # -- events --------------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send event ``event`` with ``data`` to every negotiated client. Any thread.

        The timestamp is taken now. Raises :class:`ApiError` if ``data`` is not JSON-able.
        Events emitted while the server is not running are dropped.
        """
        now = time.time()
        seconds = int(now)
        message = {
            "event": event,
            "data": dict(data or {}),
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
        try:
            encoded = _encode(message)
        except (TypeError, ValueError) as error:
            raise ApiError(f"event {event!r}: data is not JSON-serialisable: {error}") from error
        if self._thread is None or self._stopping:
            log.debug("control API not running; event %s dropped", event)
            return
        with self._events_lock:
            self._events.append(encoded)
        self._wake()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Create the socket (mode 0600) and start serving. Raises :class:`ApiSocketError`."""
        with self._state_lock:
            if self._closed:
                raise ApiError("this control API server was closed; create a new one")
            if self._thread is not None:
                raise ApiError("the control API server is already running")
            listener, socket_id = _bind_listener(self.path)
            self._listener, self._socket_id = listener, socket_id
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector = selectors.DefaultSelector()
            self._selector.register(listener, selectors.EVENT_READ)
            self._selector.register(self._wake_r, selectors.EVENT_READ)
            self._thread = threading.Thread(target=self._serve, name="api-server", daemon=True)
            self._thread.start()
        log.info("control API listening on %s", self.path)

    def close(self) -> None:
        """Stop serving, flush queued replies and events briefly, remove the socket file.

        The file is removed only if it is still the socket this server created. Idempotent;
        may be called from a handler (the reply to that request is still sent).
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            thread = self._thread
        if thread is None:
            return
        self._wake()
        if thread is not threading.current_thread():
            thread.join()

    @property
    def running(self) -> bool:
        """Whether the server thread is serving."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def serves_path(self) -> bool:
        """Whether :attr:`path` is still this server's socket (during an upgrade a new VMM
        renames its own socket over it)."""
        if self._socket_id is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._socket_id

    @property
    def client_count(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is None:
            return
        # A full buffer means it is awake already; an error means it is shutting down.
        with contextlib.suppress(OSError):
            wake.send(b"\0")

    # -- the server thread ---------------------------------------------------------------

    def _serve(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    else:
                        client: _Client = key.data
                        if mask & selectors.EVENT_READ and not client.closed:
                            self._read(client)
                        if mask & selectors.EVENT_WRITE and not client.closed:
                            self._send(client)
                    if self._stopping:
                        break
                self._deliver_events()
        except Exception:
            log.exception("control API server failed; the VMM keeps running without it")
        finally:
            self._shutdown()

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, _addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.warning("control API: accept failed: %s", error)
            return
        sock.setblocking(False)
        if len(self._clients) >= self.max_clients:
            log.warning("control API: %d clients already connected; refusing one", self.max_clients)
            desc = f"too many control connections ({self.max_clients}); close one and try again"
            with contextlib.suppress(OSError):
                sock.send(_encode({"error": {"class": GENERIC_ERROR, "desc": desc}}))
            sock.close()
            return
        client = _Client(sock, self._next_client, JsonStreamSplitter(self.max_message))
        self._next_client += 1
        self._clients[client.number] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        log.debug("control API: client %d connected", client.number)
        self._queue(client, _encode({"QMP": {"version": version_info(), "capabilities": []}}))

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.debug("control API: client %d: %s", client.number, error)
            self._drop(client)
            return
        if not data:
            self._hang_up(client)  # end of input; replies already queued are still sent
            return
        try:
            frames = client.splitter.feed(data)
        except _Oversized:
            log.warning(
                "control API: client %d sent a message over %d bytes; disconnecting it",
                client.number,
                self.max_message,
            )
            desc = f"message longer than {self.max_message} bytes; connection closed"
            self._queue(client, _encode({"error": {"class": GENERIC_ERROR, "desc": desc}}))
            self._hang_up(client)
            return
        for frame in frames:
            if client.closing or client.closed:
                return
            if isinstance(frame, _Garbage):
                desc = f"JSON parse error, {frame.desc}"
                self._queue(client, _encode({"error": {"class": GENERIC_ERROR, "desc": desc}}))
            else:
                self._handle_message(client, frame)

    def _handle_message(self, client: _Client, text: bytes) -> None:
        try:
            request = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as error:
            detail = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            desc = f"JSON parse error, {detail}"
            self._queue(client, _encode({"error": {"class": GENERIC_ERROR, "desc": desc}}))
            return
        if not isinstance(request, dict):
            desc = "QMP input must be a JSON object"
            self._queue(client, _encode({"error": {"class": GENERIC_ERROR, "desc": desc}}))
            return
        reply: dict[str, Any]
        try:
            reply = {"return": self._execute(client, request)}
        except _Reply as error:
            reply = {"error": {"class": error.error_class, "desc": error.desc}}
        if "id" in request:
            reply["id"] = request["id"]
        try:
            encoded = _encode(reply)
        except (TypeError, ValueError) as error:
            name = request.get("execute")
            log.error("control API: command %r returned a non-JSON value: %s", name, error)
            desc = f"internal error: command {name!r} returned a value that is not JSON"
            reply = {"error": {"class": GENERIC_ERROR, "desc": desc}}
            if "id" in request:
                reply["id"] = request["id"]
            encoded = _encode(reply)
        # Events the handler emitted precede its reply, as in QEMU.
        self._deliver_events()
        self._queue(client, encoded)

    def _execute(self, client: _Client, request: dict[str, Any]) -> Any:
        if "exec-oob" in request:
            raise _Reply(GENERIC_ERROR, "out-of-band execution ('exec-oob') is not supported")
        for key in request:
            if key not in ("execute", "arguments", "id"):
                raise _Reply(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise _Reply(GENERIC_ERROR, "QMP input lacks member 'execute'")
        name = request["execute"]
        if not isinstance(name, str):
            raise _Reply(GENERIC_ERROR, "QMP input member 'execute' must be a string")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise _Reply(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        if not client.negotiated:
            if name != "qmp_capabilities":
                raise _Reply(
                    COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            return self._qmp_capabilities(client, arguments)
        if name == "qmp_capabilities":
            raise _Reply(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        with self._commands_lock:
            command = self._commands.get(name)
        if command is None:
            raise _Reply(COMMAND_NOT_FOUND, f"The command {name} has not been found")
        log.debug("control API: client %d: %s %s", client.number, name, arguments)
        try:
            check_arguments(command.schema, arguments)
            result = command.handler(dict(arguments))
        except CommandError as error:
            raise _Reply(error.error_class, error.desc) from error
        except IntrahostError as error:
            raise _Reply(GENERIC_ERROR, str(error)) from error
        except Exception as error:
            log.exception("control API: command %r failed", name)
            raise _Reply(
                GENERIC_ERROR, f"internal error in {name!r}: {type(error).__name__}: {error}"
            ) from error
        return {} if result is None else result

    def _qmp_capabilities(self, client: _Client, arguments: dict[str, Any]) -> Any:
        try:
            check_arguments({"enable": (list, False)}, arguments)
        except CommandError as error:
            raise _Reply(GENERIC_ERROR, error.desc) from error
        for capability in arguments.get("enable", []):
            if not isinstance(capability, str):
                raise _Reply(GENERIC_ERROR, "Parameter 'enable' expects an array of strings")
            raise _Reply(GENERIC_ERROR, f"Capability '{capability}' not available")
        client.negotiated = True
        return {}

    def _deliver_events(self) -> None:
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        if not events:
            return
        payload = b"".join(events)
        for client in list(self._clients.values()):
            if client.negotiated and not client.closing and not client.closed:
                self._queue(client, payload)

    def _queue(self, client: _Client, data: bytes) -> None:
        if client.closed:
            return
        client.outbuf += data
        if len(client.outbuf) > MAX_OUTPUT:
            log.warning(
                "control API: client %d is not reading (%d bytes unsent); disconnecting it",
                client.number,
                len(client.outbuf),
            )
            self._drop(client)
            return
        self._send(client)

    def _send(self, client: _Client) -> None:
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                log.debug("control API: client %d: %s", client.number, error)
                self._drop(client)
                return
            del client.outbuf[:sent]
        if client.closing and not client.outbuf:
            self._drop(client)
            return
        self._update_interest(client)

    def _update_interest(self, client: _Client) -> None:
        assert self._selector is not None
        events = 0 if client.closing else selectors.EVENT_READ
        if client.outbuf:
            events |= selectors.EVENT_WRITE
        if events:
            self._selector.modify(client.sock, events, client)

    def _hang_up(self, client: _Client) -> None:
        """Send what is queued, then close."""
        client.closing = True
        self._send(client)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.pop(client.number, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()
        log.debug("control API: client %d disconnected", client.number)

    def _shutdown(self) -> None:
        # Order: deliver pending events, give clients a moment to take queued replies and
        # events, close them, close the listener, then remove the socket file if it is ours.
        self._deliver_events()
        if self._selector is not None:
            for sock in (self._listener, self._wake_r):
                if sock is not None:
                    self._selector.unregister(sock)
        deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT
        for client in list(self._clients.values()):
            client.closing = True
            if not client.closed:
                self._send(client)
        while self._clients and time.monotonic() < deadline and self._selector is not None:
            for key, _mask in self._selector.select(deadline - time.monotonic()):
                self._send(key.data)
        for client in list(self._clients.values()):
            self._drop(client)
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            self._listener.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_w = None
        self._stopping = True
        _remove_if_ours(self.path, self._socket_id)
        log.info("control API on %s closed", self.path)


# -- the socket file ---------------------------------------------------------------------


def check_socket_directory(path: str, what: str = "socket") -> str | None:
    """Warn (log, and return the warning) if others could replace the socket at ``path``.

    The socket itself is 0600, so nobody else can connect to it; but whoever may write its
    directory may unlink it and put their own socket there, and clients would then talk to
    them. Unsafe: a directory writable by group or others without the sticky bit (/tmp has
    it: there only a file's owner may remove the file), or one owned by another user than
    this one and root.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError:
        return None  # a missing directory is reported by whoever creates the socket
    mode = stat.S_IMODE(st.st_mode)
    warning = None
    writers = [
        w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if mode & bit
    ]
    if writers and not mode & stat.S_ISVTX:
        warning = (
            f"{what} {path}: directory {parent} (mode {mode:04o}) is writable by "
            f"{' and '.join(writers)} and not sticky, so they can replace the socket; use a "
            f"directory only you can write (e.g. mkdir -m 700)"
        )
    elif st.st_uid not in (os.getuid(), 0):
        warning = (
            f"{what} {path}: directory {parent} belongs to uid {st.st_uid}, who can replace "
            f"the socket; use a directory of your own"
        )
    if warning is not None:
        log.warning("%s", warning)
    return warning


_staging_names = itertools.count()


def _bind_listener(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking socket at ``path``, mode 0600, and its (st_dev, st_ino)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ApiSocketError(
            f"control socket path {path!r} is {len(os.fsencode(path))} bytes; unix sockets "
            f"allow at most {MAX_SOCKET_PATH}: choose a shorter path"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ApiSocketError(
            f"cannot create control socket {path!r}: directory {parent!r} does not exist"
        )
    check_socket_directory(path, "control socket")
    _clear_stale(path)
    # Bind under a name of its own in the same directory, listen, then link the socket to
    # ``path``: the path appears only once a connection to it can succeed (a client that
    # sees the file may connect at once), and link() never replaces a file that appeared
    # at ``path`` meanwhile.
    staging = os.path.join(parent, f".ih{os.getpid()}-{next(_staging_names)}")
    if len(os.fsencode(staging)) > MAX_SOCKET_PATH:
        raise ApiSocketError(
            f"control socket path {path!r}: its directory's path is too long for a unix "
            f"socket (the VMM first binds {staging!r} beside it): choose a shorter directory"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Linux creates the socket file with the socket inode's mode (less the umask), so the
        # file is 0600 from its first moment; the check after bind() covers other kernels.
        os.fchmod(sock.fileno(), 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        try:
            sock.bind(staging)
        except OSError as error:
            raise ApiSocketError(
                f"cannot create control socket {path!r}: {error.strerror}"
            ) from error
        try:
            st = os.lstat(staging)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(staging, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            try:
                os.link(staging, path)
            except FileExistsError as error:
                raise ApiSocketError(
                    f"cannot create control socket {path!r}: another process created it just "
                    f"now; is another VMM starting with the same socket path?"
                ) from error
            except OSError as error:
                raise ApiSocketError(
                    f"cannot create control socket {path!r}: {error.strerror}"
                ) from error
        finally:
            os.unlink(staging)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def socket_state(path: str) -> str:
    """What is at ``path``: "absent", "not-a-socket", "stale" (a socket file nobody listens
    on), "live" (a process accepts connections on it); raises OSError when it can't tell."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISSOCK(st.st_mode):
        return "not-a-socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except FileNotFoundError:
        return "absent"
    finally:
        probe.close()
    return "live"


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``."""
    try:
        state = socket_state(path)
    except OSError as error:
        raise ApiSocketError(
            f"cannot tell whether control socket {path!r} is in use ({error.strerror}); "
            f"if no VMM uses it, remove it"
        ) from error
    if state == "not-a-socket":
        raise ApiSocketError(
            f"cannot create control socket {path!r}: the path exists and is not a socket; "
            f"remove it or choose another path"
        )
    if state == "stale":
        log.info("removing stale control socket %s (nothing listens on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif state == "live":
        raise ApiSocketError(
            f"control socket {path!r} is live: another process is listening on it (another "
            f"intrahost VMM?); stop that process or choose another path"
        )


def _remove_if_ours(path: str, socket_id: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is the one with ``socket_id``.

    Not "stat, then unlink": a new VMM renames its own socket over the path during an upgrade,
    and a rename falling between the two would have its socket removed. Instead, whatever is
    at the path is moved aside in one step (rename), and looked at there: ours is removed;
    another's is linked back, unless yet another socket took the path meanwhile.
    """
    if socket_id is None:
        return
    aside = f"{path}.closing-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    st = os.lstat(aside)
    if (st.st_dev, st.st_ino) != socket_id:
        log.info("control socket %s was replaced by someone else; leaving it", path)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # unlike rename, never replaces what is there now
    os.unlink(aside)
