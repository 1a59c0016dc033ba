"""Helpers shared by the tests: /dev/kvm gating and VMM processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm (read/write)")

#: Seconds a test waits for something that must happen (a process starts or exits, a guest
#: counts, a peer answers). Generous on purpose: on a loaded host a process or a guest can be
#: held up for many seconds. A wait ends as soon as its condition holds, so an idle host does
#: not pay for it. (A window in which something must *not* happen is another matter: it is
#: short, and a slow host cannot make it fail.)
PATIENCE = 60.0

T = TypeVar("T")


class VmmProcess:
    """An ``intrahost`` CLI process (a VMM) for tests: real process, real sockets."""

    def __init__(
        self, args: list[str], workdir: Path, name: str = "vmm", prefix: Sequence[str] = ()
    ) -> None:
        """``prefix``: a command that execs the VMM, e.g. ``ip netns exec NS``."""
        self.args = args
        self.log = workdir / f"{name}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "intrahost", "--log-level", "info", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = PATIENCE) -> int:
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
            self.proc.wait(PATIENCE)
        self._log.close()


def wait_until(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float = PATIENCE,
    proc: VmmProcess | None = None,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns a true value, and return that value.

    Raises AssertionError naming ``what`` (what was awaited) after ``timeout`` seconds, or as
    soon as ``proc``, a VMM the condition depends on, has exited (with its output)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise AssertionError(f"VMM exited while waiting for {what}:\n{proc.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_advanced(
    read: Callable[[], Sequence[int]],
    before: Sequence[int],
    what: str = "the guest's counters to advance",
    timeout: float = PATIENCE,
) -> list[int]:
    """Wait until every counter ``read()`` returns is above its value in ``before`` (the
    guest runs on every vCPU), and return the counters then."""

    def advanced() -> list[int] | None:
        now = list(read())
        ok = len(now) == len(before) and all(b > a for a, b in zip(before, now, strict=True))
        return now if ok else None

    try:
        return wait_until(advanced, what, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}: before {list(before)}, now {list(read())}") from None


def wait_for_path(path: Path, proc: VmmProcess | None = None, timeout: float = PATIENCE) -> None:
    wait_until(path.exists, f"{path} to appear", timeout, proc, interval=0.01)
