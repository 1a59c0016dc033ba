"""The waiting VMM (``run --incoming``, QEMU's ``inmigrate``) on real processes: it survives
whatever connects to its migration socket that is not a hand-off, and failed hand-offs, and
keeps waiting; it serves its control socket while it waits; only a successful hand-off,
``quit``, SIGTERM/SIGINT or its ``--incoming-timeout`` end the wait."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import VmmProcess, needs_kvm, wait_for_path

from intrahost.migration.protocol import FRAME
from intrahost.service.qmp_client import QmpClient, QmpConnectionError, QmpError

pytestmark = needs_kvm


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _source(vmm_factory: Any, sockdir: Path, name: str, memory: str = "32M") -> Path:
    api = sockdir / f"{name}.sock"
    vmm_factory(
        "run", "--memory", memory, "--guest-args", "progress=16777216", "--serial", "none",
        "--api-socket", str(api), name=name, wait_path=api,
    )  # fmt: skip
    return api


def _waiting(vmm_factory: Any, sockdir: Path, *extra: str) -> tuple[VmmProcess, Path, Path]:
    mig, api = sockdir / "mig.sock", sockdir / "dest.sock"
    proc = vmm_factory(
        "run", "--incoming", f"unix:{mig}", "--serial", "none", "--api-socket", str(api),
        *extra, name="dest", wait_path=mig,
    )  # fmt: skip
    wait_for_path(api, proc)
    return proc, mig, api


def _migrate(api: Path, mig: Path) -> dict[str, Any]:
    with QmpClient(api) as qmp:
        qmp.execute("migrate", uri=f"unix:{mig}")
        deadline = time.monotonic() + 60
        while (result := qmp.execute("query-migrate"))["status"] == "active":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    return dict(result)


def _counter(api: Path) -> int:
    with QmpClient(api) as qmp:
        return sum(c["count"] for c in qmp.execute("query-vm").get("counter", []))


def _serving(api: Path) -> None:
    """Wait until the VMM at ``api`` serves its guest's commands (right after its hand-off,
    for a moment, it still answers as the waiting VMM: inmigrate)."""
    deadline = time.monotonic() + 20
    while _query(api, "query-status")["status"] == "inmigrate":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _query(api: Path, command: str) -> Any:
    with QmpClient(api) as qmp:
        return qmp.execute(command)


def _wait_failed_attempts(api: Path, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        progress = dict(_query(api, "query-migrate"))
        if progress["failed-attempts"] >= count and progress["status"] == "waiting":
            return progress
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)


def _fds(pid: int) -> set[str]:
    """What the process's fds point at (sockets by inode: a new one is a different one)."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.add(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return targets


def _junk(mig: Path) -> None:
    """What a mistaken or hostile local user can send: garbage, an immediate close, a port
    scan, a frame header of nonsense, a QMP client, `intrahost status` on the wrong socket,
    a second `run --incoming` on the same path."""
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * FRAME.size + b"junk", b""):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(mig))
        if payload:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):  # it closed with input unread
                while s.recv(4096):
                    pass
        s.close()
    for _ in range(40):  # a port scan: connect, close
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(mig))
        s.close()
    with pytest.raises(QmpConnectionError):
        QmpClient(mig, timeout=1)
    status = cli("status", "--api-socket", str(mig))
    assert status.returncode != 0 and "Traceback" not in status.stderr
    second = cli("run", "--incoming", f"unix:{mig}")
    assert second.returncode == 1 and "already waits" in second.stderr


def test_junk_on_the_migration_socket_leaves_it_waiting_then_a_hand_off_succeeds(
    vmm_factory: Any, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(vmm_factory, sockdir, "source")
    with monkeypatch.context() as env:
        env.setenv("INTRAHOST_MIGRATION_TIMEOUT", "3")  # silent peers are closed after 3 s
        dest, mig, api = _waiting(vmm_factory, sockdir)
    _junk(mig)
    assert dest.alive(), dest.output()
    assert _query(api, "query-status") == {"status": "inmigrate", "running": False}
    progress = _query(api, "query-migrate")
    assert progress["status"] == "waiting" and progress["dropped-connections"] >= 40
    # A peer that connects and says nothing holds nothing up: the hand-off goes past it.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(mig))
    try:
        result = _migrate(source, mig)
    finally:
        silent.close()
    assert result["status"] == "completed", (result, dest.output())
    _serving(api)
    before = _counter(api)
    deadline = time.monotonic() + 10
    while _counter(api) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    arrived = _query(api, "query-migrate")
    assert arrived["status"] == "completed" and arrived["direction"] == "incoming"
    assert arrived["failed-attempts"] >= 1  # the garbage that got as far as a frame header
    blackout = arrived["blackout"]
    assert blackout["import_us"] > 0 and blackout["state_bytes"] > 0 and "build_us" in blackout
    assert "resume_us" in blackout
    assert not mig.exists()


def test_the_waiting_vmms_control_socket_and_quit(vmm_factory: Any, sockdir: Path) -> None:
    dest, mig, api = _waiting(vmm_factory, sockdir)
    with QmpClient(api) as qmp:
        assert qmp.execute("query-status") == {"status": "inmigrate", "running": False}
        progress = qmp.execute("query-migrate")
        assert progress["status"] == "waiting" and progress["direction"] == "incoming"
        assert progress["uri"] == f"unix:{mig}" and progress["failed-attempts"] == 0
        with pytest.raises(QmpError, match="no guest yet: this VMM waits for a hand-off"):
            qmp.execute("query-vm")
        with pytest.raises(QmpError, match="no guest yet"):
            qmp.execute("migrate", uri="unix:/nowhere")
        version = qmp.execute("query-version")
        assert version["package"].startswith("intrahost ")
        qmp.execute("quit")
        event = qmp.wait_event("SHUTDOWN", timeout=10)
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert dest.wait(20) == 0
    assert not api.exists() and not mig.exists()
    assert "stopped waiting for a hand-off (quit)" in dest.log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_wait_cleanly(vmm_factory: Any, sockdir: Path, sig: int) -> None:
    dest, mig, api = _waiting(vmm_factory, sockdir)
    dest.proc.send_signal(sig)
    assert dest.wait(20) == 0
    assert not api.exists() and not mig.exists()
    assert f"stopped waiting for a hand-off ({signal.Signals(sig).name})" in dest.log.read_text()


def test_a_failed_hand_off_leaves_it_waiting_for_the_next(vmm_factory: Any, sockdir: Path) -> None:
    """A refused hand-off (the source's guest has other memory than this VMM's --memory)
    discards what the attempt built; the next source's hand-off then succeeds."""
    wrong = _source(vmm_factory, sockdir, "wrong", memory="64M")
    right = _source(vmm_factory, sockdir, "right")
    dest, mig, api = _waiting(vmm_factory, sockdir, "--memory", "32M")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a first failed attempt
        s.connect(str(mig))
        s.sendall(b"\xff" * FRAME.size)
    _wait_failed_attempts(api, 1)
    fds = _fds(dest.pid)
    result = _migrate(wrong, mig)
    assert result["status"] == "failed" and "--memory" in result["error-desc"]
    assert _query(wrong, "query-status")["status"] == "running"
    progress = _wait_failed_attempts(api, 2)
    assert "--memory" in progress["last-error"]
    assert dest.alive() and mig.exists()
    deadline = time.monotonic() + 5  # (control connections close asynchronously)
    while len(_fds(dest.pid)) > len(fds) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_fds(dest.pid)) <= len(fds), f"the failed attempt leaked fds: {_fds(dest.pid) - fds}"
    assert _migrate(right, mig)["status"] == "completed", dest.output()
    _serving(api)
    assert _query(api, "query-status")["status"] == "running"
    assert _query(api, "query-migrate")["failed-attempts"] == 2


def test_incoming_timeout_ends_the_wait(sockdir: Path) -> None:
    mig = sockdir / "mig.sock"
    started = time.monotonic()
    result = cli("run", "--incoming", f"unix:{mig}", "--incoming-timeout", "1.5")
    assert result.returncode == 1
    assert "no hand-off arrived" in result.stderr and "within 1.5 s" in result.stderr
    assert time.monotonic() - started < 30
    assert not mig.exists()


def test_quit_during_an_attempt_leaves_the_guest_on_the_source(
    vmm_factory: Any, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quit while a hand-off is under way (here: the destination stalls in READY) aborts the
    attempt before the commit point: the source resumes the guest."""
    from intrahost.migration import faults

    source = _source(vmm_factory, sockdir, "source")
    with monkeypatch.context() as env:
        env.setenv(faults.ENV, "destination:recv-ready:stall")
        env.setenv("INTRAHOST_MIGRATION_TIMEOUT", "2")
        dest, mig, api = _waiting(vmm_factory, sockdir)
    with QmpClient(source) as qmp:
        qmp.execute("migrate", uri=f"unix:{mig}")
        deadline = time.monotonic() + 20
        while (progress := _query(api, "query-migrate")).get("state") != "configured":
            assert time.monotonic() < deadline, progress  # (it stalls on READY there)
            time.sleep(0.02)
        assert progress["status"] == "active" and progress["source-pid"] > 0
        _query(api, "quit")
        assert dest.wait(30) == 0, dest.log.read_text()
        deadline = time.monotonic() + 30
        while (result := qmp.execute("query-migrate"))["status"] == "active":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert result["status"] == "failed"
        assert qmp.execute("query-status")["status"] == "running"
    assert not api.exists() and not mig.exists()


def test_the_waiting_vmm_serves_beside_a_live_control_socket(
    vmm_factory: Any, sockdir: Path
) -> None:
    """Upgrade: the new VMM is given the old VMM's live socket path. Until the hand-off it
    answers at PATH.new-PID; then it renames that over PATH."""
    source = _source(vmm_factory, sockdir, "source")
    mig = sockdir / "mig.sock"
    dest = vmm_factory(
        "run", "--incoming", f"unix:{mig}", "--serial", "none", "--api-socket", str(source),
        name="dest", wait_path=mig,
    )  # fmt: skip
    beside = Path(f"{source}.new-{dest.pid}")
    wait_for_path(beside, dest)
    assert _query(beside, "query-status")["status"] == "inmigrate"
    assert _query(source, "query-status")["status"] == "running"  # still the old VMM
    assert _migrate(source, mig)["status"] == "completed"
    deadline = time.monotonic() + 20
    while True:
        try:
            if _query(source, "query-vm")["pid"] == dest.pid:
                break
        except QmpConnectionError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not beside.exists()
    assert json.dumps(_query(source, "query-migrate")).count('"incoming"') == 1
