"""The intrahost command in subprocesses: run / status / pause / resume / stop and every user
error, each a single clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm, wait_until


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=(os.environ | env) if env else None,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: Any, text: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert text in lines[0], lines[0]


@needs_kvm
def test_run_status_pause_resume_stop(vmm_factory: Any, sockdir: Path) -> None:
    api = sockdir / "api.sock"
    serial = sockdir / "serial.log"
    vmm = vmm_factory(
        "run",
        "--memory",
        "32M",
        "--vcpus",
        "2",
        "--guest-args",
        "progress=16777216",
        "--serial",
        f"file:{serial}",
        "--api-socket",
        str(api),
        wait_path=api,
    )
    assert api.stat().st_mode & 0o777 == 0o600

    def counting() -> dict[str, Any] | None:
        status: dict[str, Any] = json.loads(cli("status", "--api-socket", str(api)).stdout)
        counts = [c["count"] > 0 for c in status["vm"].get("counter", [])]
        return status if counts == [True, True] else None

    status = wait_until(counting, "both vCPUs to count", proc=vmm, interval=0.05)
    assert status["status"] == "running"
    assert status["vm"]["vcpus"] == 2 and status["vm"]["memory"] == 32 << 20
    assert cli("pause", "--api-socket", str(api)).returncode == 0
    assert json.loads(cli("status", "--api-socket", str(api)).stdout)["status"] == "paused"
    assert cli("resume", "--api-socket", str(api)).returncode == 0
    assert json.loads(cli("status", "--api-socket", str(api)).stdout)["status"] == "running"
    wait_until(lambda: " count=" in serial.read_text(), "a count line on the serial console")
    assert cli("stop", "--api-socket", str(api)).returncode == 0
    assert vmm.wait() == 0
    assert not api.exists()
    assert " count=" in serial.read_text()


@needs_kvm
def test_hello_runs_to_its_end_and_exits_zero(sockdir: Path) -> None:
    result = cli("run", "--guest", "hello", "--memory", "16M")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello from intrahost\n"


def test_no_kvm_device(sockdir: Path) -> None:
    result = cli("run", env={"INTRAHOST_KVM_DEVICE": str(sockdir / "kvm")})
    assert_one_line_error(result, "has no KVM")


def test_no_permission_on_the_kvm_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root opens any file whatever its mode, so the refusal is simulated at os.open.
    from intrahost import cli as cli_module

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    assert cli_module.main(["run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no permission to open /dev/kvm" in err[0]
    assert "kvm' group" in err[0]


@needs_kvm
@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("--memory", "100T"), "more than this host can back"),
        (("--memory", "lots"), "invalid size"),
        (("--vcpus", "0"), "--vcpus must be between"),
        (("--guest", "/nonexistent/guest.elf"), "guest"),
        (("--serial", "tty:x"), "unknown console"),
    ],
    ids=["memory-too-big", "memory-bad", "vcpus", "guest-path", "serial"],
)
def test_run_errors(args: tuple[str, ...], text: str) -> None:
    assert_one_line_error(cli("run", *args), text)


@needs_kvm
def test_bad_guest_format(sockdir: Path) -> None:
    bad = sockdir / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x02" + bytes(60))  # a 64-bit ELF header: not ours
    result = cli("run", "--guest", str(bad), "--memory", "16M")
    assert_one_line_error(result, "ELF")


@needs_kvm
def test_api_socket_in_use_is_refused_and_a_stale_one_replaced(
    vmm_factory: Any, sockdir: Path
) -> None:
    api = sockdir / "api.sock"
    vmm_factory(
        "run", "--memory", "16M", "--serial", "none", "--api-socket", str(api), wait_path=api
    )
    assert_one_line_error(
        cli("run", "--memory", "16M", "--serial", "none", "--api-socket", str(api)), "in use"
    )
    cli("stop", "--api-socket", str(api))
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    proc = vmm_factory(
        "run", "--memory", "16M", "--serial", "none", "--api-socket", str(stale), name="second"
    )
    wait_until(
        lambda: cli("status", "--api-socket", str(stale)).returncode == 0,
        "the VMM to replace the stale socket",
        proc=proc,
        interval=0.1,
    )
    cli("stop", "--api-socket", str(stale))


def test_control_commands_without_a_vmm(sockdir: Path) -> None:
    for command in ("status", "pause", "resume", "stop"):
        assert_one_line_error(
            cli(command, "--api-socket", str(sockdir / "none.sock")), "no control socket"
        )


@needs_kvm
def test_incoming_on_a_live_socket_is_refused(vmm_factory: Any, sockdir: Path) -> None:
    mig = sockdir / "mig.sock"
    vmm_factory("run", "--incoming", f"unix:{mig}", wait_path=mig)
    assert_one_line_error(cli("run", "--incoming", f"unix:{mig}"), "already waits")
    assert_one_line_error(cli("run", "--incoming", "tcp:1.2.3.4:5"), "unix:PATH")
