"""Starting a new VMM process for ``intrahost upgrade``: as this process's child, or adopted by
the service manager under systemd (:func:`spawn_vmm`).

Kept apart from :mod:`intrahost.service.runner`, and light to import (no KVM, no machine): the
command line starts the new VMM with it, and its own start-up is on the upgrade's critical path.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Sequence
from typing import IO

from intrahost.errors import IntrahostError
from intrahost.service.notify import Notifier


class SpawnError(IntrahostError):
    """A new VMM's process could not be started (see :func:`spawn_vmm`)."""


class NewVmm:
    """A VMM process started by :func:`spawn_vmm`: its pid, whether it still runs, its exit
    status when known (None while it runs, and for an adopted process, which is not this
    process's child, after it exited too)."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self._child = child
        self._pidfd = os.pidfd_open(pid) if child is None else -1
        self.returncode: int | None = None

    @property
    def adopted(self) -> bool:
        """Whether the process was handed to the service manager (see :func:`spawn_vmm`)."""
        return self._child is None

    def running(self) -> bool:
        if self._child is not None:
            self.returncode = self._child.poll()
            return self.returncode is None
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable

    def wait(self, timeout: float) -> bool:
        """Wait until it exits; False if it still runs after ``timeout`` seconds."""
        if self._child is not None:
            try:
                self.returncode = self._child.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)

    def terminate(self) -> None:
        """SIGTERM: a VMM still waiting for its guest gives up, one that runs a guest shuts
        it down (see :class:`StopSignals`)."""
        with contextlib.suppress(ProcessLookupError):
            if self._child is not None:
                self._child.terminate()
            else:
                signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def spawn_vmm(
    argv: Sequence[str],
    output: int | IO[bytes] | None,
    stderr: int | IO[bytes] | None = None,
    pass_fds: Sequence[int] = (),
    adopt: bool | None = None,
) -> NewVmm:
    """Start a new VMM (``intrahost upgrade``'s), its stdin /dev/null, its stdout to
    ``output`` and its stderr to ``stderr`` (default: ``output``), with ``pass_fds`` open in
    it, in this process's cgroup (so, under systemd, in the unit's).

    With ``adopt`` (default: when ``NOTIFY_SOCKET`` is set, i.e. under systemd), the VMM is
    started by a short-lived intermediate process that exits at once, so that the VMM is
    adopted by the service manager (the subreaper above this process) before it takes the
    guest. That matters: when the new VMM names itself the unit's main process (MAINPID=),
    systemd fully supervises it only if it is systemd's own child; a main process that is
    not (an "alien" one) is neither waited for on ``systemctl stop`` (it is sent SIGTERM, and
    where systemd cannot wait for the cgroup to empty, SIGKILLed at once) nor reaped with its
    exit status. Without ``adopt`` the VMM is this process's child, in a session of its own
    (it outlives this command and must not get the terminal's signals)."""
    if adopt is None:
        adopt = Notifier().enabled
    stderr = output if stderr is None else stderr

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
        )

    if not adopt:
        try:
            child = start()
        except OSError as e:
            raise SpawnError(f"cannot start the new VMM {argv[0]}: {e.strerror or e}") from None
        return NewVmm(child.pid, child)
    read, write = os.pipe2(os.O_CLOEXEC)
    intermediate = os.fork()
    if intermediate == 0:  # the intermediate: start the VMM, report its pid, exit
        try:
            os.close(read)
            vmm = start()
            os.write(write, str(vmm.pid).encode())
        except OSError as e:
            os.write(write, f"!{e.strerror or e}".encode(errors="replace"))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read().decode(errors="replace")
    os.waitpid(intermediate, 0)
    if not reported.isdigit():
        reason = reported[1:] if reported.startswith("!") else "the starter process failed"
        raise SpawnError(f"cannot start the new VMM {argv[0]}: {reason}")
    return NewVmm(int(reported), None)
