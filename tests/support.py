"""Helpers shared by the tests: /dev/kvm gating and VMM processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm (read/write)")


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
