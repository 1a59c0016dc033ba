"""`intrahost platform stop`: asks the running model platform service to exit cleanly, and
refuses while guests still use it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sev_testlib import ServiceHandle, wait_for, wait_idle


def platform_stop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", "platform", "stop", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_stop_ends_an_idle_service_cleanly(service_factory: Callable[..., ServiceHandle]) -> None:
    handle = service_factory()
    pid = handle.proc.pid
    done = platform_stop("--socket", handle.path)
    assert done.returncode == 0, done.stderr
    assert f"pid {pid}" in done.stdout and handle.path in done.stdout
    # It has exited by the time the command returns, its socket and pid file removed.
    assert handle.proc.poll() == 0
    assert not os.path.exists(handle.path) and not os.path.exists(handle.path + ".pid")


def test_stop_refuses_while_a_guest_uses_the_service(
    service_factory: Callable[..., ServiceHandle],
) -> None:
    handle = service_factory()
    platform = handle.platform()
    vm = platform.create_vm()
    try:
        done = platform_stop("--socket", handle.path)
        assert done.returncode == 1
        assert "1 VM" in done.stderr and "stop their VMMs first" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert handle.proc.poll() is None
        assert platform.platform_state()["vms"]  # the guest's VM is untouched
    finally:
        vm.close()
        wait_idle(platform)
        platform.close()
    done = platform_stop("--socket", handle.path)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: handle.proc.poll() is not None, what="the service to exit")


def test_stop_without_a_service_says_there_is_nothing_to_stop(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    done = platform_stop("--socket", str(path))
    assert done.returncode == 0, done.stderr
    assert "nothing to stop" in done.stdout
    assert not path.exists()  # it did not start one either
