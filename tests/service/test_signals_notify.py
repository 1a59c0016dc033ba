"""SIGTERM/SIGINT stop a VMM as ``quit`` does, and systemd's readiness protocol, spoken to a
real datagram socket (a path, and an abstract ``@`` address): READY=1 with MAINPID when the
control socket serves, STOPPING=1 on shutdown, and during an upgrade the new VMM's
READY=1/MAINPID before the old VMM exits, with no STOPPING=1 from the old one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs_kvm, wait_for_path

from intrahost.service.notify import Notifier
from intrahost.service.qmp_client import QmpClient


class NotifySocket:
    """A bound AF_UNIX SOCK_DGRAM socket, as systemd's; ``address`` is NOTIFY_SOCKET."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 20) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(fields)
        return fields

    def until(self, key: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next(max(0.1, deadline - time.monotonic()))
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(sockdir / "notify")
        sock = NotifySocket(path, path)
    else:
        name = f"intrahost-test-{uuid.uuid4().hex}"
        sock = NotifySocket(f"@{name}", b"\0" + name.encode())
    yield sock
    sock.close()


def test_notifier_sends_key_value_lines(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("serving")
    assert notify_socket.next(5) == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving"}
    assert notifier.stopping("bye")
    assert notify_socket.next(5) == {"STOPPING": "1", "STATUS": "bye"}


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready("x")
    assert not Notifier({"NOTIFY_SOCKET": "relative"}).enabled


def test_a_vanished_notify_socket_is_logged_not_fatal(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(sockdir / "gone")})
    assert not notifier.ready("x")
    assert "cannot notify systemd" in caplog.text


def _start(
    sockdir: Path, api: Path, env: dict[str, str], *extra: str, name: str = "vmm"
) -> subprocess.Popen[bytes]:
    log = (sockdir / f"{name}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable, "-m", "intrahost", "--log-level", "info", "run", "--memory", "32M",
            "--guest-args", "progress=16777216", "--serial", "none", "--api-socket", str(api),
            *extra,
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ | env,
    )  # fmt: skip


@needs_kvm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_vmm_like_quit(sockdir: Path, sig: int) -> None:
    api = sockdir / "api.sock"
    proc = _start(sockdir, api, {})
    try:
        wait_for_path(api)
        with QmpClient(api) as qmp:
            proc.send_signal(sig)
            event = qmp.wait_event("SHUTDOWN", timeout=20)
        assert event["data"] == {"guest": False, "reason": "host-signal"}
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not api.exists()
    log = (sockdir / "vmm.log").read_text()
    assert f"shutting the guest down ({signal.Signals(sig).name})" in log
    assert "Traceback" not in log


@needs_kvm
def test_ready_mainpid_and_stopping(sockdir: Path, notify_socket: NotifySocket) -> None:
    api = sockdir / "api.sock"
    proc = _start(sockdir, api, {"NOTIFY_SOCKET": notify_socket.address})
    try:
        ready = notify_socket.until("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert str(api) in ready["STATUS"]
        with QmpClient(api) as qmp:  # READY=1 came once the control socket served
            assert qmp.execute("query-status")["status"] == "running"
        proc.terminate()
        stopping = notify_socket.until("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_kvm
def test_json_logs_from_a_vmm(sockdir: Path) -> None:
    api = sockdir / "api.sock"
    log = (sockdir / "vmm.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "intrahost", "run", "--log-format", "json", "--log-level",
            "info", "--memory", "16M", "--serial", "none", "--api-socket", str(api),
        ],
        stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_path(api)
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = [json.loads(line) for line in (sockdir / "vmm.log").read_text().splitlines()]
    assert entries and all(e["pid"] == proc.pid for e in entries)
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("control API listening" in e["message"] for e in entries)


@needs_kvm
def test_upgrade_moves_the_main_pid_to_the_new_vmm(
    sockdir: Path, notify_socket: NotifySocket
) -> None:
    """Under systemd the new VMM names itself the main pid (READY=1, MAINPID) before the old
    VMM exits; the old VMM, having handed its guest off, never says STOPPING=1."""
    api = sockdir / "api.sock"
    env = {"NOTIFY_SOCKET": notify_socket.address}
    old = _start(sockdir, api, env, name="old")
    upgrade: subprocess.Popen[str] | None = None
    try:
        assert notify_socket.until("READY")["MAINPID"] == str(old.pid)
        upgrade = subprocess.Popen(
            [sys.executable, "-m", "intrahost", "upgrade", "--api-socket", str(api), "--output",
             str(sockdir / "new.log"), "--", "--serial", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            env=os.environ | env,
        )  # fmt: skip
        ready = notify_socket.until("READY", timeout=60)
        new_pid = int(ready["MAINPID"])
        assert new_pid != old.pid
        assert old.poll() is None, "the old VMM exited before the new one took the main pid"
        _out, err = upgrade.communicate(timeout=60)
        assert upgrade.returncode == 0, err
        assert old.wait(30) == 0
        assert not any("STOPPING" in m for m in notify_socket.messages)
        with QmpClient(api) as qmp:
            assert qmp.execute("query-vm")["pid"] == new_pid
            arrival = qmp.execute("query-migrate")
            assert arrival["status"] == "completed" and arrival["direction"] == "incoming"
            qmp.execute("quit")
        assert notify_socket.until("STOPPING")["STOPPING"] == "1"
        _wait_gone(new_pid)
    finally:
        for proc in (old, upgrade):
            if proc is not None and proc.poll() is None:
                proc.kill()


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
