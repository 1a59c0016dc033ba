"""Helpers for the benchmarks: child processes and files that are always cleaned up, waiting
for a condition, reading the counter guest through its memory file, and small statistics.

    with Workspace("handoff") as ws:               # removes everything on exit, also on Ctrl-C
        shm = ws.shm_file("64M")                   # /dev/shm/intrahost-handoff-PID-64M
        vmm = ws.spawn([...], "source")            # own session; output in ws.dir/source.log
        counters = GuestCounters(shm, vcpus=1)
        wait_until(lambda: counters.running() == 1, 30, "the guest to start", vmm)
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from intrahost.closing import Closeable
from intrahost.vmm.guests import layout

SHM = Path("/dev/shm")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class BenchError(Exception):
    """The benchmark cannot go on (a VMM failed, a guest did not start, ...)."""


# --- processes and files -----------------------------------------------------------------------


class Workspace(Closeable):
    """Everything one bench run creates — child processes, files under /dev/shm, a temporary
    directory for sockets and logs — and its removal in :meth:`close`.

    Children run in their own session, so that a Ctrl-C reaches only the bench, which then
    stops them in order (SIGTERM, then SIGKILL) instead of racing them.
    """

    def __init__(self, name: str) -> None:
        self.prefix = f"intrahost-{name}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._procs: list[tuple[subprocess.Popen[str], IO[str] | None]] = []
        self._files: list[Path] = []
        self._remove_stale_files()

    def shm_file(self, tag: str) -> Path:
        """A /dev/shm path for guest memory, removed by :meth:`close` (not created here)."""
        path = SHM / f"{self.prefix}-{os.getpid()}-{tag}"
        self._files.append(path)
        return path

    def path(self, name: str) -> Path:
        """A path in the workspace directory (sockets, logs)."""
        return self.dir / name

    def spawn(
        self,
        argv: Sequence[str],
        log_name: str,
        *,
        pipes: bool = False,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[str]:
        """Start ``argv`` with stderr (and stdout, unless ``pipes``) in ``log_name``.log.

        With ``pipes`` the child's stdin and stdout are text pipes to this process; ``env``
        replaces the environment; ``pass_fds`` are inherited by the child (same numbers).
        """
        log = open(self.path(f"{log_name}.log"), "a")  # noqa: SIM115 -- closed in stop()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                text=True,
                start_new_session=True,
                env=env,
                pass_fds=tuple(pass_fds),
            )
        except BaseException:
            log.close()
            raise
        self._procs.append((proc, log))
        return proc

    def log_tail(self, log_name: str, lines: int = 15) -> str:
        try:
            text = self.path(f"{log_name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
        """End ``proc`` (SIGTERM, then SIGKILL) unless it has exited; reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        for i, (p, log) in enumerate(self._procs):
            if p is proc:
                if log is not None:
                    log.close()
                del self._procs[i]
                break

    def close(self) -> None:
        """Stop every child still running, then remove the files and the directory."""
        while self._procs:
            self.stop(self._procs[-1][0])
        for path in self._files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._files.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_stale_files(self) -> None:
        """Memory files left by an earlier run of this bench that was killed outright."""
        for path in SHM.glob(f"{self.prefix}-*-*"):
            pid = path.name[len(self.prefix) + 1 :].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    path.unlink()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks and :class:`Workspace` clean
    up as they do on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    interval: float = 0.005,
) -> None:
    """Poll ``condition`` until it holds; BenchError after ``timeout`` s or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"process {proc.pid} exited ({proc.returncode}) while waiting for {what}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- the counter guest, seen through its memory file ------------------------------------------


class GuestCounters:
    """Read-only view of the counter guest's status page in a memory file (a /dev/shm file,
    or another process's memfd as /proc/PID/fd/N)."""

    def __init__(self, path: str | Path, vcpus: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, layout.STATUS_END, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.vcpus = vcpus
        self._counters = [layout.slot_addr(i) + layout.SLOT_COUNTER for i in range(vcpus)]
        self._gaps = [layout.slot_addr(i) + layout.SLOT_MAX_GAP for i in range(vcpus)]

    def counters(self) -> list[int]:
        return [_U64.unpack_from(self._map, off)[0] for off in self._counters]

    def counter(self, vcpu: int = 0) -> int:
        value: int = _U64.unpack_from(self._map, self._counters[vcpu])[0]
        return value

    def max_gaps(self) -> list[int]:
        """Each vCPU's largest RDTSC gap (TSC ticks) since the last reset."""
        return [_U64.unpack_from(self._map, off)[0] for off in self._gaps]

    def running(self) -> int:
        """vCPUs that reached the counting loop (0 before the guest wrote its status page)."""
        magic: int = _U64.unpack_from(self._map, layout.STATUS_ADDR)[0]
        if magic != layout.STATUS_MAGIC_U64:
            return 0
        value: int = _U32.unpack_from(self._map, layout.STATUS_ADDR + layout.STATUS_RUNNING)[0]
        return value

    def close(self) -> None:
        self._map.close()


# --- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between order statistics (with
    10 values the p99 is 0.91 x the largest + 0.09 x the second largest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)
