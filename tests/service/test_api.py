"""The control API: socket safety, the QMP wire protocol, and real QMP clients."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient
from support import PATIENCE, wait_until

from intrahost.errors import IntrahostError
from intrahost.service.api import (
    MAX_MESSAGE,
    ApiError,
    ApiServer,
    ApiSocketError,
    CommandError,
    JsonStreamSplitter,
)
from intrahost.service.qmp_client import QmpClient, QmpConnectionError, QmpError, QmpTimeoutError

# -- a small device to drive -------------------------------------------------------------


class Counter:
    """The commands under test: real handlers on a real object."""

    def __init__(self, server: ApiServer) -> None:
        self.value = 0
        self.lock = threading.Lock()
        self.server = server
        server.register("counter-add", self.add, {"by": (int, False), "note": (str, False)})
        server.register("counter-get", self.get)
        server.register("counter-set", self.set, {"value": (int, True)})
        server.register("counter-fail", self.fail, {"how": (str, True)})

    def add(self, args: dict[str, Any]) -> dict[str, int]:
        with self.lock:
            self.value += args.get("by", 1)
            value = self.value
        self.server.emit("COUNTER_CHANGED", {"value": value})
        return {"value": value}

    def get(self, args: dict[str, Any]) -> dict[str, int]:
        return {"value": self.value}

    def set(self, args: dict[str, Any]) -> None:
        if args["value"] < 0:
            raise CommandError("the counter cannot go below zero; pass a value >= 0")
        self.value = args["value"]

    def fail(self, args: dict[str, Any]) -> Any:
        how = args["how"]
        if how == "intrahost":
            raise IntrahostError("the guest is not running; start it first")
        if how == "class":
            raise CommandError("no such device", "DeviceNotFound")
        if how == "bug":
            raise ZeroDivisionError("division by zero")
        if how == "not-json":
            return {"value": {1, 2}}
        return None


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "api.sock")


@pytest.fixture
def served(sock_path: str) -> Iterator[tuple[ApiServer, Counter]]:
    server = ApiServer(sock_path)
    counter = Counter(server)
    with server:
        yield server, counter


class Raw:
    """A hand-driven client: bytes in, one message per CRLF-terminated line out."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(PATIENCE)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def message(self) -> dict[str, Any]:
        value = json.loads(self.line())
        assert isinstance(value, dict)
        return value

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event (events are kept in ``events``)."""
        while "event" in (message := self.message()):
            self.events.append(message)
        return message

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(message).encode())
        return self.reply()

    def negotiate(self) -> None:
        assert "QMP" in self.message()
        assert self.request({"execute": "qmp_capabilities"}) == {"return": {}}

    def at_eof(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True  # the server closed with our unread request bytes still queued
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


# -- the socket file ---------------------------------------------------------------------


def test_socket_is_0600_whatever_the_umask(sock_path: str) -> None:
    old = os.umask(0)
    try:
        with ApiServer(sock_path):
            st = os.lstat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        os.umask(old)
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # a VMM that died without cleaning up
    assert os.path.exists(sock_path)
    with ApiServer(sock_path), QmpClient(sock_path) as client:
        assert client.execute("query-version")["package"].startswith("intrahost ")


def test_live_socket_is_refused(sock_path: str) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sock_path)
    other.listen()
    try:
        with pytest.raises(ApiSocketError, match="another process is listening on it"):
            ApiServer(sock_path).start()
        assert os.path.exists(sock_path)  # not removed
    finally:
        other.close()


def test_live_intrahost_server_is_refused(sock_path: str) -> None:
    with ApiServer(sock_path):
        with pytest.raises(ApiSocketError, match="is live"):
            ApiServer(sock_path).start()
        with QmpClient(sock_path) as client:  # the first one is unharmed
            client.execute("query-commands")


def test_non_socket_paths_are_refused(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.sock")
    for path in (regular, link, tmp_path):
        with pytest.raises(ApiSocketError, match="exists and is not a socket"):
            ApiServer(path).start()
    assert regular.read_text() == "keep me"
    with pytest.raises(ApiSocketError, match="does not exist"):
        ApiServer(tmp_path / "no" / "such" / "dir.sock").start()
    with pytest.raises(ApiSocketError, match="at most 107"):
        ApiServer(tmp_path / ("x" * 120)).start()


def test_close_removes_only_our_socket(sock_path: str) -> None:
    server = ApiServer(sock_path)
    server.start()
    os.unlink(sock_path)
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    replacement.bind(sock_path)
    try:
        server.close()
        assert os.path.exists(sock_path)  # someone else's now
    finally:
        replacement.close()
    server.close()  # idempotent
    with pytest.raises(ApiError, match="was closed"):
        server.start()


def test_errors_are_intrahost_errors() -> None:
    for cls in (ApiError, ApiSocketError, CommandError, QmpError, QmpConnectionError):
        assert issubclass(cls, IntrahostError)


# -- the wire protocol -------------------------------------------------------------------


def test_greeting_is_qmp_shaped(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    raw = Raw(sock_path)
    line = raw.sock.recv(65536)
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    greeting = json.loads(line)
    assert greeting["QMP"]["capabilities"] == []
    version = greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in version["qemu"].values())
    assert version["package"].startswith("intrahost ")


def test_commands_before_negotiation_are_refused(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    _, counter = served
    raw = Raw(sock_path)
    raw.message()
    reply = raw.request({"execute": "counter-add", "id": 1})
    assert error_of(reply) == (
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    )
    assert reply["id"] == 1
    assert counter.value == 0
    assert raw.request({"execute": "qmp_capabilities", "id": "n"}) == {"return": {}, "id": "n"}
    reply = raw.request({"execute": "qmp_capabilities"})
    assert error_of(reply)[0] == "CommandNotFound"
    assert "already complete" in error_of(reply)[1]
    assert raw.request({"execute": "counter-add"}) == {"return": {"value": 1}}


def test_capabilities_cannot_enable_unknown_features(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    raw = Raw(sock_path)
    raw.message()
    reply = raw.request({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert error_of(reply) == ("GenericError", "Capability 'oob' not available")
    reply = raw.request({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}})
    assert error_of(reply) == ("GenericError", "Parameter 'enable' expects array")
    assert raw.request({"execute": "qmp_capabilities", "arguments": {"enable": []}}) == {
        "return": {}
    }


def test_ids_of_any_json_type_are_echoed(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    for request_id in (7, "x", [1, {"a": None}], {"n": 1.5}, None):
        reply = raw.request({"execute": "counter-get", "id": request_id})
        assert reply == {"return": {"value": 0}, "id": request_id}
    assert "id" not in raw.request({"execute": "counter-get"})


def test_malformed_input_gets_errors_and_the_session_goes_on(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    raw.send(b"{bad json\n")
    reply = raw.message()
    assert error_of(reply)[0] == "GenericError"
    assert error_of(reply)[1].startswith("JSON parse error")
    assert "id" not in reply
    raw.send(b'{"execute": "counter-get", "id": 1,}')  # balanced braces, invalid JSON
    assert error_of(raw.message())[1].startswith("JSON parse error")
    raw.send(b"42\n")
    assert error_of(raw.message())[1].startswith("JSON parse error")
    raw.send(b'["execute", "counter-get"]')
    assert error_of(raw.message()) == ("GenericError", "QMP input must be a JSON object")
    raw.send(b'{"execute": "counter-get", "value": NaN}')
    assert error_of(raw.message())[1].startswith("JSON parse error")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": 5}, "QMP input member 'execute' must be a string"),
        ({"execute": "counter-get", "arguments": [1]}, "'arguments' must be an object"),
        ({"execute": "counter-get", "extra": 1}, "QMP input member 'extra' is unexpected"),
        ({"exec-oob": "counter-get"}, "out-of-band execution ('exec-oob') is not supported"),
    ]
    for request, desc in cases:
        reply = raw.request(request)
        assert reply["error"]["class"] == "GenericError"
        assert desc in reply["error"]["desc"]
    assert raw.request({"execute": "counter-get", "id": 2}) == {"return": {"value": 0}, "id": 2}
    # A streaming client that never sends line ends recovers at the next '{'.
    raw.send(b'{"execute": oops}{"execute": "counter-get", "id": 3}')
    assert error_of(raw.message())[1] == "JSON parse error, invalid character 'o' in JSON"
    assert raw.message() == {"return": {"value": 0}, "id": 3}
    raw.send(b'garbage {"execute": "counter-get", "id": 4}')
    assert error_of(raw.message())[1].startswith("JSON parse error, expected a JSON object")
    assert raw.message() == {"return": {"value": 0}, "id": 4}


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3)
                ),
                max_leaves=8,
            ),
            max_size=4,
        ),
        max_size=5,
    ),
    separators=st.lists(st.sampled_from(["", " ", "\n", "\r\n", "\t"]), min_size=5, max_size=5),
    indent=st.sampled_from([None, 1]),
    chunk=st.integers(min_value=1, max_value=40),
)
def test_stream_splitter_finds_every_message(
    messages: list[dict[str, Any]], separators: list[str], indent: int | None, chunk: int
) -> None:
    stream = "".join(
        json.dumps(m, indent=indent) + sep for m, sep in zip(messages, separators, strict=False)
    ).encode()
    splitter = JsonStreamSplitter(MAX_MESSAGE)
    frames: list[Any] = []
    for start in range(0, len(stream), chunk):
        frames += splitter.feed(stream[start : start + chunk])
    assert all(isinstance(frame, bytes) for frame in frames)
    assert [json.loads(frame) for frame in frames] == messages
    assert not splitter.pending


def test_unknown_commands(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    reply = raw.request({"execute": "format-disk", "id": 3})
    assert reply == {
        "error": {"class": "CommandNotFound", "desc": "The command format-disk has not been found"},
        "id": 3,
    }


def test_arguments_are_checked_before_the_handler_runs(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    _, counter = served
    raw = Raw(sock_path)
    raw.negotiate()
    for arguments, desc in [
        ({"by": "2"}, "Parameter 'by' expects integer"),
        ({"by": 1.5}, "Parameter 'by' expects integer"),
        ({"by": True}, "Parameter 'by' expects integer"),
        ({"note": 3}, "Parameter 'note' expects string"),
        ({"bye": 1}, "Parameter 'bye' is unexpected"),
    ]:
        reply = raw.request({"execute": "counter-add", "arguments": arguments})
        assert error_of(reply) == ("GenericError", desc)
    reply = raw.request({"execute": "counter-set"})
    assert error_of(reply) == ("GenericError", "Parameter 'value' is missing")
    reply = raw.request({"execute": "counter-get", "arguments": {"x": 1}})
    assert error_of(reply) == ("GenericError", "Parameter 'x' is unexpected")
    assert counter.value == 0
    assert raw.request({"execute": "counter-add", "arguments": {"by": 5, "note": "ok"}}) == {
        "return": {"value": 5}
    }


def test_handler_failures_become_error_replies(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    reply = raw.request({"execute": "counter-set", "arguments": {"value": -1}})
    assert error_of(reply) == (
        "GenericError",
        "the counter cannot go below zero; pass a value >= 0",
    )
    assert raw.request({"execute": "counter-set", "arguments": {"value": 9}}) == {"return": {}}

    def fail(how: str) -> tuple[str, str]:
        return error_of(raw.request({"execute": "counter-fail", "arguments": {"how": how}}))

    assert fail("intrahost") == ("GenericError", "the guest is not running; start it first")
    assert fail("class") == ("DeviceNotFound", "no such device")
    cls, desc = fail("bug")
    assert cls == "GenericError" and "internal error" in desc and "ZeroDivisionError" in desc
    cls, desc = fail("not-json")
    assert cls == "GenericError" and "not JSON" in desc
    assert raw.request({"execute": "counter-fail", "arguments": {"how": "none"}}) == {"return": {}}
    assert raw.request({"execute": "counter-get"}) == {"return": {"value": 9}}


def test_requests_are_a_json_stream(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    # Several requests in one write, no separators; one request split over writes and lines.
    raw.send(b'{"execute":"counter-add","id":1}{"execute":"counter-add","id":2}')
    assert raw.reply() == {"return": {"value": 1}, "id": 1}
    assert raw.reply() == {"return": {"value": 2}, "id": 2}
    raw.send(b'{"execute":\r\n "counter-add", "arguments": {"note": "a } in a string\\"')
    time.sleep(0.05)
    raw.send(b'"}, "id": 3}\n')
    assert raw.reply() == {"return": {"value": 3}, "id": 3}


def test_oversized_message_ends_the_session(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    raw = Raw(sock_path)
    raw.negotiate()
    other = Raw(sock_path)
    other.negotiate()
    payload = b'{"execute": "counter-add", "arguments": {"note": "' + b"x" * MAX_MESSAGE
    with pytest.raises(OSError):  # the server hangs up while we are still sending
        raw.send(payload + b'"}}' + b" " * (1 << 20))
    reply = raw.message()
    assert error_of(reply) == (
        "GenericError",
        f"message longer than {MAX_MESSAGE} bytes; connection closed",
    )
    assert raw.at_eof()
    assert other.request({"execute": "counter-get"}) == {"return": {"value": 0}}


def test_oversized_message_below_the_socket_buffer(sock_path: str) -> None:
    with ApiServer(sock_path, max_message=64):
        raw = Raw(sock_path)
        raw.negotiate()
        raw.send(b'{"execute": "query-version", "arguments": {"pad": "' + b"y" * 100)
        assert error_of(raw.message())[1] == "message longer than 64 bytes; connection closed"
        assert raw.at_eof()


def test_silent_clients_do_not_block_others(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    server, _ = served
    silent = Raw(sock_path)  # connects, never speaks, never reads
    half = Raw(sock_path)
    half.message()
    half.send(b'{"execute": "qmp_capab')  # starts a request and stalls
    deaf = Raw(sock_path)
    deaf.negotiate()  # then never reads again while events pile up
    for i in range(2000):
        server.emit("NOISE", {"i": i, "pad": "z" * 200})
    with QmpClient(sock_path, timeout=PATIENCE) as client:
        assert client.execute("counter-add", by=2) == {"value": 2}
    # The server notices the QmpClient's hang-up; the three stalled clients stay connected.
    wait_until(lambda: server.client_count <= 3, "the server to drop the QmpClient")
    assert server.client_count == 3
    half.send(b'ilities"}')
    assert half.message() == {"return": {}}
    for raw in (silent, half, deaf):
        raw.close()


def test_events_reach_every_negotiated_client(
    served: tuple[ApiServer, Counter], sock_path: str
) -> None:
    server, _ = served
    first, second, unnegotiated = Raw(sock_path), Raw(sock_path), Raw(sock_path)
    first.negotiate()
    second.negotiate()
    unnegotiated.message()
    before = time.time()
    # From another thread, as a vCPU or the migration thread would.
    thread = threading.Thread(target=server.emit, args=("STOP",))
    thread.start()
    thread.join()
    for raw in (first, second):
        event = raw.message()
        assert event["event"] == "STOP" and event["data"] == {}
        stamp = event["timestamp"]
        assert set(stamp) == {"seconds", "microseconds"}
        assert 0 <= stamp["microseconds"] < 1_000_000
        assert before - 1 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= time.time() + 1
    # A handler's events come before its reply.
    first.send(b'{"execute": "counter-add", "id": "a"}')
    assert first.message()["event"] == "COUNTER_CHANGED"
    assert first.message() == {"return": {"value": 1}, "id": "a"}
    assert second.message()["data"] == {"value": 1}
    # The client that never negotiated got nothing.
    assert unnegotiated.request({"execute": "qmp_capabilities"}) == {"return": {}}
    with pytest.raises(ApiError, match="not JSON-serialisable"):
        server.emit("BAD", {"x": object()})


def test_many_clients_at_once(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    _, counter = served
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with QmpClient(sock_path) as client:
                for _ in range(50):
                    client.execute("counter-add")
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert counter.value == 400


def test_too_many_clients_are_told_so(sock_path: str) -> None:
    with ApiServer(sock_path, max_clients=2) as server:
        kept = [Raw(sock_path), Raw(sock_path)]
        for raw in kept:
            raw.message()
        extra = Raw(sock_path)
        assert error_of(extra.message())[1].startswith("too many control connections (2)")
        assert extra.at_eof()
        kept[0].close()
        wait_until(lambda: server.client_count < 2, "the server to notice a client left")
        with QmpClient(sock_path) as client:
            client.execute("query-version")


def test_a_handler_may_close_the_server(sock_path: str) -> None:
    server = ApiServer(sock_path)

    def quit_(args: dict[str, Any]) -> None:
        server.emit("SHUTDOWN", {"guest": False})
        server.close()

    server.register("quit", quit_)
    server.start()
    raw = Raw(sock_path)
    raw.negotiate()
    raw.send(b'{"execute": "quit", "id": 1}')
    assert raw.message()["event"] == "SHUTDOWN"
    assert raw.message() == {"return": {}, "id": 1}
    assert raw.at_eof()
    wait_until(lambda: not os.path.exists(sock_path), f"{sock_path} to be removed")
    assert not server.running


def test_registration_rules(sock_path: str) -> None:
    server = ApiServer(sock_path)
    server.register("thing", lambda args: None)
    with pytest.raises(ApiError, match="already registered"):
        server.register("thing", lambda args: None)
    with pytest.raises(ApiError, match="built into the server"):
        server.register("qmp_capabilities", lambda args: None)
    with pytest.raises(ApiError, match=r"must be \(type, required\)"):
        server.register("bad", lambda args: None, {"x": (bytes, True)})
    with pytest.raises(ApiError, match=r"must be \(type, required\)"):
        server.register("bad", lambda args: None, {"x": (int, "yes")})  # type: ignore[dict-item]
    server.unregister("thing")
    server.register("thing", lambda args: None)
    assert server.commands == ("qmp_capabilities", "query-commands", "query-version", "thing")


def test_commands_registered_while_running(sock_path: str) -> None:
    with ApiServer(sock_path) as server, QmpClient(sock_path) as client:
        with pytest.raises(QmpError) as missing:
            client.execute("late")
        assert missing.value.error_class == "CommandNotFound"
        server.register("late", lambda args: "here")
        assert client.execute("late") == "here"
        assert {"name": "late"} in client.execute("query-commands")


# -- the synchronous client --------------------------------------------------------------


def test_sync_client(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    server, _ = served
    with QmpClient(sock_path) as client:
        assert client.greeting is not None and "QMP" in client.greeting
        assert client.execute("counter-add", {"by": 3}, note="n") == {"value": 3}
        with pytest.raises(QmpError) as error:
            client.execute("counter-set", value=-5)
        assert error.value.error_class == "GenericError"
        assert error.value.desc == "the counter cannot go below zero; pass a value >= 0"
        assert error.value.command == "counter-set"
        assert str(error.value).startswith("counter-set: the counter cannot go below zero")
        events = client.events()
        assert [e["data"]["value"] for e in events] == [3]
        assert client.events() == []
        threading.Timer(0.1, server.emit, args=("RESUME",)).start()
        assert client.wait_event("RESUME", timeout=PATIENCE)["event"] == "RESUME"
        with pytest.raises(QmpTimeoutError):
            client.wait_event("NEVER", timeout=0.1)


def test_sync_client_connection_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(QmpConnectionError, match="no control socket"):
        QmpClient(missing)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(QmpConnectionError, match="nothing listens"):
        QmpClient(tmp_path / "stale.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen()
    try:
        started = time.monotonic()
        with pytest.raises(QmpTimeoutError, match="no answer"):
            QmpClient(tmp_path / "mute.sock", timeout=0.3)
        assert time.monotonic() - started < 3
    finally:
        mute.close()


def test_sync_client_sees_the_server_go_away(sock_path: str) -> None:
    server = ApiServer(sock_path)
    server.start()
    client = QmpClient(sock_path)
    server.close()
    with pytest.raises(QmpConnectionError):
        client.execute("query-version")
    client.close()


# -- QEMU's own client -------------------------------------------------------------------


def test_qemu_qmp_client(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    server, counter = served

    async def session() -> None:
        qmp = QMPClient("intrahost-test")
        await qmp.connect(sock_path)
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.capabilities == []
            version = await qmp.execute("query-version")
            assert isinstance(version, dict) and version["package"].startswith("intrahost")
            with qmp.listener("COUNTER_CHANGED") as listener:
                assert await qmp.execute("counter-add", {"by": 4}) == {"value": 4}
                event = await asyncio.wait_for(listener.get(), PATIENCE)
                assert event["data"] == {"value": 4}
            assert await qmp.execute("counter-set", {"value": 10}) == {}
            with pytest.raises(ExecuteError) as error:
                await qmp.execute("counter-set", {"value": -1})
            assert error.value.error_class == "GenericError"
            with pytest.raises(ExecuteError) as error:
                await qmp.execute("counter-add", {"by": "x"})
            assert error.value.error.error.desc == "Parameter 'by' expects integer"
            with pytest.raises(ExecuteError) as error:
                await qmp.execute("no-such-command")
            assert error.value.error_class == "CommandNotFound"
            commands = await qmp.execute("query-commands")
            assert isinstance(commands, list) and {"name": "counter-add"} in commands
        finally:
            await qmp.disconnect()

    asyncio.run(session())
    assert counter.value == 10
    assert server.running


def test_qemu_qmp_clients_share_events(served: tuple[ApiServer, Counter], sock_path: str) -> None:
    server, _ = served

    async def session() -> None:
        clients = [QMPClient(f"c{i}") for i in range(3)]
        listeners = [EventListener("STOP") for _ in clients]
        for qmp, listener in zip(clients, listeners, strict=True):
            qmp.register_listener(listener)
            await qmp.connect(sock_path)
        try:
            await asyncio.to_thread(server.emit, "STOP", {"reason": "test"})
            for listener in listeners:
                event = await asyncio.wait_for(listener.get(), PATIENCE)
                assert event["data"] == {"reason": "test"}
            results = await asyncio.gather(
                *(qmp.execute("counter-add", {"by": 1}) for qmp in clients)
            )
            assert sorted(r["value"] for r in results) == [1, 2, 3]  # type: ignore[index]
        finally:
            for qmp in clients:
                await qmp.disconnect()

    asyncio.run(session())
