"""The control API of a real VMM process: through QEMU's own client (qemu.qmp) and a raw
socket; bad input gets QMP errors and the guest keeps running."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from support import PATIENCE, needs_kvm, wait_until

from intrahost.service.qmp_client import QmpClient

pytestmark = needs_kvm


@pytest.fixture
def vmm(vmm_factory: Any, sockdir: Path) -> tuple[Any, Path]:
    api = sockdir / "api.sock"
    proc = vmm_factory(
        "run",
        "--memory",
        "32M",
        "--vcpus",
        "2",
        "--guest-args",
        "progress=16777216",
        "--serial",
        "none",
        "--api-socket",
        str(api),
        wait_path=api,
    )
    return proc, api


def _total(api: Path) -> int:
    with QmpClient(api) as qmp:
        return sum(c["count"] for c in qmp.execute("query-vm").get("counter", []))


def _wait_counting(api: Path) -> None:
    wait_until(lambda: _total(api) > 0, "the guest to count", interval=0.05)


def test_qemu_qmp_client_drives_the_vmm(vmm: tuple[Any, Path]) -> None:
    proc, api = vmm
    _wait_counting(api)

    async def session() -> dict[str, Any]:
        qmp = QMPClient("test")
        await qmp.connect(str(api))
        try:
            status = await qmp.execute("query-status")
            assert status == {"status": "running", "running": True}
            with qmp.listener() as listener:
                await qmp.execute("stop")
                event = await asyncio.wait_for(listener.get(), PATIENCE)
                assert event["event"] == "STOP"
                assert (await qmp.execute("query-status"))["status"] == "paused"
                await qmp.execute("cont")
                event = await asyncio.wait_for(listener.get(), PATIENCE)
                assert event["event"] == "RESUME"
            info: dict[str, Any] = await qmp.execute("query-vm")
            return info
        finally:
            await qmp.disconnect()

    info = asyncio.run(session())
    assert info["vcpus"] == 2 and info["guest"] == "counter"
    assert len(info["exits"]) == 2 and info["uptime"] > 0
    assert all(c["count"] > 0 for c in info["counter"])
    assert "max-gap-ticks" in info["counter"][0]
    assert proc.alive()


def _raw(api: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PATIENCE)
    s.connect(str(api))
    return s


def _read_json(s: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    return json.loads(buf.split(b"\r\n")[0])  # type: ignore[no-any-return]


def test_bad_input_gets_errors_and_the_guest_keeps_running(vmm: tuple[Any, Path]) -> None:
    proc, api = vmm
    _wait_counting(api)
    s = _raw(api)
    assert "QMP" in _read_json(s)
    s.sendall(b'{"execute": "query-status"}\n')
    assert _read_json(s)["error"]["class"] == "CommandNotFound"  # before qmp_capabilities
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert _read_json(s) == {"return": {}}
    s.sendall(b"{this is not json\n")
    assert _read_json(s)["error"]["class"] == "GenericError"
    s.sendall(b'{"execute": "no-such-command", "id": 7}\n')
    reply = _read_json(s)
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 7
    s.sendall(b'{"execute": "migrate", "arguments": {"uri": 5}}\n')
    assert _read_json(s)["error"]["class"] == "GenericError"
    silent = _raw(api)  # connects and never speaks: must not block anyone
    before = _total(api)
    wait_until(lambda: _total(api) > before, "the guest to go on counting")
    s.sendall(b'{"execute": "query-status"}\n')
    assert _read_json(s)["return"]["status"] == "running"
    silent.close()
    s.close()
    assert proc.alive()


def test_quit_emits_shutdown_and_ends_the_vmm(vmm: tuple[Any, Path]) -> None:
    proc, api = vmm
    with QmpClient(api) as qmp:
        qmp.execute("quit")
        event = qmp.wait_event("SHUTDOWN", timeout=PATIENCE)
        assert event["data"]["guest"] is False
    assert proc.wait() == 0
