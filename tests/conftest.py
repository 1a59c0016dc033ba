"""Shared test fixtures: /dev/kvm gating, short socket directories, VMM processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm (read/write)")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory (unix socket paths must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ih-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class VmmProcess:
    """An ``intrahost`` CLI process (a VMM) for tests: real process, real sockets."""

    def __init__(self, args: list[str], workdir: Path, name: str = "vmm") -> None:
        self.args = args
        self.log = workdir / f"{name}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "intrahost", "--log-level", "info", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self._log.close()


def wait_for_path(path: Path, proc: VmmProcess | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and not proc.alive():
            raise AssertionError(f"VMM exited early:\n{proc.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


@pytest.fixture
def vmm_factory(sockdir: Path) -> Iterator[Any]:
    started: list[VmmProcess] = []

    def start(*args: str, name: str = "vmm", wait_path: Path | None = None) -> VmmProcess:
        proc = VmmProcess(list(args), sockdir, name)
        started.append(proc)
        if wait_path is not None:
            wait_for_path(wait_path, proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
