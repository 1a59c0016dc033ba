"""Bad input on the control socket of a real VMM process, beyond tests/vmm/test_control.py:
oversized messages, half requests, silent clients, more clients than the cap, hostile JSON
(non-UTF-8, deep nesting, 5000-digit numbers, NaN), and every VMM command with wrong, unknown
or missing arguments. Each gets a QMP error or is dropped; the VMM keeps serving, the guest
keeps counting, and a command refused for its arguments has no effect (a refused ``stop``
does not pause, a refused ``quit`` does not quit)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, VmmProcess, needs_kvm, wait_until

from intrahost.service.api import MAX_CLIENTS, MAX_MESSAGE

pytestmark = needs_kvm


class Session:
    """A raw client: sends bytes, reads CRLF-terminated JSON lines."""

    def __init__(self, path: Path, negotiate: bool = True, timeout: float = PATIENCE) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.greeting = self.read()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        value: dict[str, Any] = json.loads(line)
        return value

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while "event" in (message := self.read()):
            pass
        return message

    def execute(self, name: str, **arguments: Any) -> Any:
        self.send(json.dumps({"execute": name, "arguments": arguments}).encode())
        reply = self.reply()
        assert "return" in reply, reply
        return reply["return"]

    def wait_closed(self, timeout: float = PATIENCE) -> None:
        """Return once the server has hung up (TimeoutError if it does not)."""
        self.sock.settimeout(timeout)
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(65536):
                self._buf += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def vmm(vmm_factory: Any, sockdir: Path) -> Iterator[tuple[VmmProcess, Path]]:
    api = sockdir / "api.sock"
    proc = vmm_factory(
        "run", "--memory", "32M", "--vcpus", "2", "--serial", "none", "--api-socket", str(api),
        wait_path=api,
    )  # fmt: skip
    with _Probe(api) as probe:
        probe.wait_counting()
    yield proc, api
    assert proc.alive(), proc.output()


class _Probe:
    """A well-behaved client that checks the guest still counts and runs."""

    def __init__(self, api: Path) -> None:
        self.session = Session(api)

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def total(self) -> int:
        return sum(c["count"] for c in self.session.execute("query-vm").get("counter", []))

    def wait_counting(self) -> None:
        wait_until(lambda: self.total() > 0, "the guest to start counting", interval=0.05)

    def assert_running(self) -> None:
        assert self.session.execute("query-status") == {"status": "running", "running": True}
        before = self.total()
        wait_until(lambda: self.total() > before, "the guest to go on counting")


def _still_fine(api: Path) -> None:
    with _Probe(api) as probe:
        probe.assert_running()


def test_an_oversized_message_gets_an_error_and_the_session_ends(
    vmm: tuple[VmmProcess, Path],
) -> None:
    _proc, api = vmm
    s = Session(api)
    filler = b"A" * (MAX_MESSAGE + 4096)
    s.send(b'{"execute": "query-status", "arguments": {"x": "')
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.send(filler + b'"}}')  # the server may hang up before taking it all
    reply = s.read()
    assert reply["error"]["class"] == "GenericError"
    assert f"message longer than {MAX_MESSAGE} bytes" in reply["error"]["desc"]
    s.wait_closed()
    s.close()
    _still_fine(api)


def test_half_a_request_and_silence_do_not_hold_anyone_up(vmm: tuple[VmmProcess, Path]) -> None:
    _proc, api = vmm
    half = Session(api)
    half.send(b'{"execute": "query-st')  # ... and nothing more
    silent = Session(api, negotiate=False)  # connected, greeted, never speaks
    with _Probe(api) as probe:
        for _ in range(3):
            probe.assert_running()
    half.send(b'atus", "id": "late"}')  # the rest, much later: still one request
    assert half.reply() == {"return": {"status": "running", "running": True}, "id": "late"}
    half.close()
    silent.close()
    _still_fine(api)


def test_more_clients_than_the_cap_are_told_and_dropped(vmm: tuple[VmmProcess, Path]) -> None:
    _proc, api = vmm
    probe = _Probe(api)  # one of the MAX_CLIENTS slots
    clients: list[socket.socket] = []
    try:
        for _ in range(40 - 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(api))  # blocking: waits while the listen backlog is full
            s.settimeout(PATIENCE)
            clients.append(s)
        greeted = refused = 0
        for s in clients:
            line = s.recv(65536).split(b"\r\n")[0]
            message = json.loads(line)
            if "QMP" in message:
                greeted += 1
            else:
                assert "too many control connections" in message["error"]["desc"]
                assert s.recv(65536) == b""  # and then dropped
                refused += 1
        assert greeted == MAX_CLIENTS - 1 and refused == 40 - MAX_CLIENTS
        probe.assert_running()  # the clients inside are served meanwhile
    finally:
        for s in clients:
            s.close()
        probe.session.close()

    def slots_free() -> bool:  # the slots free up as clients leave
        try:
            _still_fine(api)
        except (AssertionError, KeyError, EOFError, json.JSONDecodeError):
            return False
        return True

    wait_until(slots_free, "a control connection to be served again", interval=0.1)


HOSTILE_JSON = [
    (b"\xff\xfe\xfd\n", "JSON parse error"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON parse error"),  # too deep for json.loads
    (b'{"execute": "query-status", "id": ' + b"9" * 5000 + b"}", "JSON parse error"),
    (b'{"execute": "query-status", "id": NaN}', "JSON parse error"),
    (b'{"execute": "query-status", "arguments": {"a": Infinity}}', "JSON parse error"),
    (b'"just a string"', "JSON parse error"),
    (b"[1, 2, 3]", "QMP input must be a JSON object"),
    (b'{"execute": ["query-status"]}', "'execute' must be a string"),
    (b'{"execute": "query-status", "arguments": []}', "'arguments' must be an object"),
    (b'{"execute": "query-status", "extra": 1}', "'extra' is unexpected"),
    (b'{"exec-oob": "query-status"}', "out-of-band execution"),
    (b'{"arguments": {}}', "lacks member 'execute'"),
    (b'{"execute": "qmp_capabilities"}', "already complete"),
    (b'{"execute": "\\u0000\\ud800"}', "has not been found"),
]


def test_hostile_json_gets_errors_and_the_session_goes_on(vmm: tuple[VmmProcess, Path]) -> None:
    _proc, api = vmm
    s = Session(api)
    for data, text in HOSTILE_JSON:
        s.send(data)
        reply = s.reply()
        assert "error" in reply and text in reply["error"]["desc"], (data[:60], reply)
        s.send(b'{"execute": "query-status", "id": 1}')  # the session is still usable
        assert s.reply()["return"]["status"] == "running", data[:60]
    s.close()
    _still_fine(api)


#: (command, arguments, text in the error). None of them may act.
BAD_ARGUMENTS = [
    ("stop", {"now": True}, "Parameter 'now' is unexpected"),
    ("cont", {"x": 1}, "Parameter 'x' is unexpected"),
    ("quit", {"force": True}, "Parameter 'force' is unexpected"),
    ("query-status", {"verbose": 1}, "Parameter 'verbose' is unexpected"),
    ("query-vm", {"": None}, "Parameter '' is unexpected"),
    ("query-migrate", {"uri": "x"}, "Parameter 'uri' is unexpected"),
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": 5}, "Parameter 'uri' expects string"),
    ("migrate", {"uri": None}, "Parameter 'uri' expects string"),
    ("migrate", {"uri": ["unix:/x"]}, "Parameter 'uri' expects string"),
    ("migrate", {"uri": "unix:/x", "blk": True}, "Parameter 'blk' is unexpected"),
    ("migrate", {"uri": "tcp:127.0.0.1:4444"}, "unix:PATH"),
    ("migrate", {"uri": "unix:"}, "unix:PATH"),
    ("migrate", {"uri": "x" * 100_000}, "unix:PATH"),
    ("query-commands", {"all": True}, "Parameter 'all' is unexpected"),
    ("no-such-command", {}, "has not been found"),
    ("Stop", {}, "has not been found"),
]


def test_wrong_arguments_to_every_command_are_refused_without_effect(
    vmm: tuple[VmmProcess, Path],
) -> None:
    proc, api = vmm
    s = Session(api)
    for i, (name, arguments, text) in enumerate(BAD_ARGUMENTS):
        s.send(json.dumps({"execute": name, "arguments": arguments, "id": i}).encode())
        reply = s.reply()
        assert reply.get("id") == i and "error" in reply, (name, reply)
        assert text in reply["error"]["desc"], (name, reply)
    assert s.execute("query-status")["status"] == "running"  # no stop, no quit
    assert s.execute("query-migrate") == {"status": "none"}  # no migration started
    s.close()
    assert proc.alive()
    _still_fine(api)


def test_a_migration_to_nowhere_fails_and_the_guest_keeps_running(
    vmm: tuple[VmmProcess, Path], sockdir: Path
) -> None:
    _proc, api = vmm
    s = Session(api)
    for uri in (f"unix:{sockdir}/nobody.sock", "unix:/proc/self/nonexistent/x"):
        assert s.execute("migrate", uri=uri) == {}
        state = wait_until(lambda: _ended(s.execute("query-migrate")), "the migration to end")
        assert state["status"] == "failed", state
        assert "no destination is waiting" in state["error-desc"], state
    s.close()
    _still_fine(api)


def _ended(state: dict[str, Any]) -> dict[str, Any] | None:
    return None if state["status"] == "active" else state
