"""A small synchronous QMP client for the control socket (stdlib only).

The CLI uses it for ``intrahost status|pause|resume|stop --api-socket PATH``::

    with QmpClient("/run/vm.sock") as qmp:
        print(qmp.execute("query-status"))

Every read waits at most ``timeout`` seconds. Events that arrive while waiting for a reply are
kept (see :meth:`QmpClient.events`, :meth:`QmpClient.wait_event`). It works against any QMP
server, QEMU included.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0

#: Longest line accepted from the server.
MAX_LINE = 16 << 20

#: Events kept (newest) until taken.
MAX_EVENTS = 1000


class QmpError(IntrahostError):
    """The server answered a command with an error."""

    def __init__(self, error_class: str, desc: str, command: str | None = None) -> None:
        where = f"{command}: " if command else ""
        super().__init__(f"{where}{desc} ({error_class})")
        self.error_class = error_class
        self.desc = desc
        self.command = command


class QmpConnectionError(IntrahostError):
    """The control socket cannot be reached, or the session broke."""


class QmpTimeoutError(QmpConnectionError):
    """The server did not answer in time."""


class QmpClient(Closeable):
    """A blocking QMP session on the unix socket at ``path``; a context manager.

    Connects and negotiates capabilities on construction unless ``connect=False``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._ids = itertools.count()
        if connect:
            self.connect()

    def connect(self) -> None:
        """Connect, read the greeting and send ``qmp_capabilities``."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError as error:
            sock.close()
            raise QmpConnectionError(
                f"no control socket at {self.path}: is the VMM running with this --api-socket?"
            ) from error
        except ConnectionRefusedError as error:
            sock.close()
            raise QmpConnectionError(
                f"nothing listens on {self.path}: the VMM that created it has exited"
            ) from error
        except PermissionError as error:
            sock.close()
            raise QmpConnectionError(
                f"permission denied on {self.path}: the socket is mode 0600, run as the "
                f"user that started the VMM"
            ) from error
        except TimeoutError as error:
            sock.close()
            raise QmpTimeoutError(f"connecting to {self.path} timed out") from error
        except OSError as error:
            sock.close()
            raise QmpConnectionError(f"cannot connect to {self.path}: {error}") from error
        self._sock = sock
        try:
            greeting = self._read_message()
            if not isinstance(greeting.get("QMP"), dict):
                raise QmpConnectionError(
                    f"{self.path} did not greet like a QMP server (got {greeting!r})"
                )
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, /, **args: Any) -> Any:
        """Run command ``name``; return its ``return`` value or raise :class:`QmpError`.

        Arguments come from the ``arguments`` mapping (for names that are not Python
        identifiers, such as ``max-bandwidth``) and from keyword arguments.
        """
        merged = {**(arguments or {}), **args}
        request: dict[str, Any] = {"execute": name, "id": f"intrahost-{next(self._ids)}"}
        if merged:
            request["arguments"] = merged
        self._send(request)
        while True:
            message = self._read_message()
            if "event" in message:
                self._events.append(message)
                continue
            if message.get("id") != request["id"]:
                if "error" in message and "id" not in message:
                    self._raise_error(message, name)  # the server could not parse our request
                log.debug("dropping QMP reply for another request: %r", message)
                continue
            if "error" in message:
                self._raise_error(message, name)
            if "return" not in message:
                raise QmpConnectionError(f"malformed QMP reply from {self.path}: {message!r}")
            return message["return"]

    def events(self, clear: bool = True) -> list[dict[str, Any]]:
        """The events received so far (and forget them unless ``clear`` is False)."""
        events = list(self._events)
        if clear:
            self._events.clear()
        return events

    def wait_event(self, name: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The first kept or next incoming event (named ``name``, if given); it is taken.

        Raises :class:`QmpTimeoutError` after ``timeout`` seconds (default: the client's).
        """
        for event in list(self._events):
            if name is None or event.get("event") == name:
                self._events.remove(event)
                return event
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeoutError(f"no {name or 'QMP'} event from {self.path} in time")
            message = self._read_message(remaining)
            if "event" not in message:
                log.debug("dropping unexpected QMP message: %r", message)
                continue
            if name is None or message.get("event") == name:
                return message
            self._events.append(message)

    def close(self) -> None:
        """Disconnect. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- wire ----------------------------------------------------------------------------

    def _raise_error(self, message: dict[str, Any], command: str) -> None:
        error = message.get("error")
        if not isinstance(error, dict):
            raise QmpConnectionError(f"malformed QMP error from {self.path}: {message!r}")
        raise QmpError(str(error.get("class")), str(error.get("desc")), command)

    def _send(self, message: Mapping[str, Any]) -> None:
        if self._sock is None:
            raise QmpConnectionError(f"not connected to {self.path}; call connect() first")
        data = json.dumps(message).encode() + b"\r\n"
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except TimeoutError as error:
            raise QmpTimeoutError(f"sending to {self.path} timed out") from error
        except OSError as error:
            raise QmpConnectionError(f"lost the connection to {self.path}: {error}") from error

    def _read_message(self, timeout: float | None = None) -> dict[str, Any]:
        line = self._read_line(self.timeout if timeout is None else timeout)
        try:
            message = json.loads(line)
        except ValueError as error:
            raise QmpConnectionError(f"{self.path} sent invalid JSON: {line[:200]!r}") from error
        if not isinstance(message, dict):
            raise QmpConnectionError(f"{self.path} sent a non-object: {line[:200]!r}")
        return message

    def _read_line(self, timeout: float) -> bytes:
        if self._sock is None:
            raise QmpConnectionError(f"not connected to {self.path}; call connect() first")
        deadline = time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.strip():
                    return line
                continue
            if len(self._buffer) > MAX_LINE:
                raise QmpConnectionError(f"{self.path} sent a line over {MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeoutError(f"no answer from {self.path} within {timeout:g} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as error:
                raise QmpTimeoutError(f"no answer from {self.path} within {timeout:g} s") from error
            except OSError as error:
                raise QmpConnectionError(f"lost the connection to {self.path}: {error}") from error
            if not chunk:
                raise QmpConnectionError(f"{self.path} closed the connection")
            self._buffer += chunk
