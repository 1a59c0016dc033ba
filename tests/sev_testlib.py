"""Helpers shared by the SEV tests."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, wait_until

from intrahost.sev import SevError
from intrahost.sevmodel.client import ModelPlatform

HERE = __file__.rsplit("/", 1)[0]
CHILD = f"{HERE}/sev/sev_child.py"


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except SevError as err:
        return err.errno
    return 0


def expect(call: Callable[[], object], expected: int) -> SevError:
    with pytest.raises(SevError) as info:
        call()
    assert info.value.errno == expected, f"expected {errno.errorcode[expected]}, got {info.value}"
    return info.value


def wait_for(predicate: Callable[[], Any], timeout: float = PATIENCE, what: str = "") -> Any:
    return wait_until(predicate, what or str(predicate), timeout, interval=0.01)


def wait_idle(platform: ModelPlatform, timeout: float = PATIENCE) -> dict[str, Any]:
    """Wait until the service has no VM left and no ASID is held (only awaiting reclaim)."""

    def idle() -> dict[str, Any] | None:
        state = platform.platform_state()
        held = set(state["asids_in_use"]) - set(state["asids_to_reclaim"])
        return state if not state["vms"] and not held else None

    result: dict[str, Any] = wait_for(idle, timeout, "every VM to be released")
    return result


@dataclass
class ServiceHandle:
    """A model platform service started by a test (with its test hooks enabled)."""

    path: str
    proc: subprocess.Popen[bytes]

    def platform(self) -> ModelPlatform:
        return ModelPlatform(self.path, autostart=False)

    def log(self) -> str:
        try:
            return Path(self.path + ".log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(directory: Path, *extra: str) -> ServiceHandle:
    path = str(directory / "sev.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "intrahost.sevmodel.service",
            "--socket",
            path,
            "--test-hooks",
            "--log-file",
            path + ".log",
            *extra,
        ]
    )
    handle = ServiceHandle(path, proc)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}: {handle.log()}")
        if os.path.exists(path):
            try:
                handle.platform().close()
                return handle
            except Exception:
                pass
        time.sleep(0.02)
    handle.stop()
    raise RuntimeError(f"the service did not start: {handle.log()}")
