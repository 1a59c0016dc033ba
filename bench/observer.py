"""The progress observer: watches a guest's counters from outside, through its memory file.

A separate process maps the guest's memory (a file under /dev/shm, a memfd reopened through
/proc/PID/fd/N, or QEMU's backing file) read-only and samples the counter guest's per-vCPU
counters in a tight loop. It records every interval longer than ``threshold_us`` during which
a vCPU's counter did not move, with CLOCK_MONOTONIC timestamps, so that a benchmark can pick
the stall that overlaps a hand-off: the **progress blackout**, the same measure for any VMM.

    obs = Observer("/dev/shm/guest", vcpus=1); obs.start()
    t0 = time.monotonic_ns(); ...hand-off...; t1 = time.monotonic_ns()
    stall_us = obs.longest_stall_between(t0, t1)   # the hand-off's progress blackout
    obs.stop()
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from intrahost.vmm.guests import layout

_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Stall:
    """One vCPU's counter stood at ``counter`` from ``start_ns`` to at least ``end_ns`` (the
    last sample that still saw it there) and had moved by ``moved_ns`` (the next sample)."""

    vcpu: int
    start_ns: int
    end_ns: int
    counter: int = 0
    moved_ns: int = 0

    @property
    def us(self) -> float:
        return (self.end_ns - self.start_ns) / 1000


class Observer:
    """A sampling child process; see the module docstring."""

    def __init__(
        self,
        path: str,
        vcpus: int = 1,
        threshold_us: float = 200.0,
        also_paths: Sequence[str] = (),
        interval_us: float = 0.0,
    ) -> None:
        """``also_paths``: further memory files of the same guest (the copy baseline's
        destination has its own memfd); a vCPU's counter is then the largest value in any.
        ``interval_us``: sleep about this long between samples instead of spinning; a spinning
        observer takes a whole CPU from the guest, which shows on a host with few CPUs."""
        self.path = path
        self.interval_us = interval_us
        self.also_paths = list(also_paths)
        self.vcpus = vcpus
        self.threshold_us = threshold_us
        self._proc: subprocess.Popen[str] | None = None
        self.stalls: list[Stall] = []

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                self.path,
                str(self.vcpus),
                str(self.threshold_us),
                str(self.interval_us),
                *self.also_paths,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C is for the parent; this child ends at EOF
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "ready" once it samples
        if line.strip() != "ready":
            raise RuntimeError(f"observer did not start: {line!r}")

    def collect(self) -> list[Stall]:
        """Stalls recorded so far (the observer keeps running)."""
        assert self._proc is not None and self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write("collect\n")
        self._proc.stdin.flush()
        data = json.loads(self._proc.stdout.readline())
        self.stalls += [Stall(*s) for s in data]
        return self.stalls

    def longest_stall_between(self, t0_ns: int, t1_ns: int) -> float:
        """The longest stall (µs, any vCPU) overlapping [t0, t1]; 0 if none was seen."""
        stalls = [s for s in self.collect() if s.end_ns >= t0_ns and s.start_ns <= t1_ns]
        return max((s.us for s in stalls), default=0.0)

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(5)
            self._proc = None


def _sample(
    path: str,
    vcpus: int,
    threshold_us: float,
    interval_us: float = 0.0,
    also_paths: Sequence[str] = (),
) -> None:
    """The child: sample until stdin closes; answer 'collect' with the stalls since the last."""
    import selectors

    mem = _map(path)
    extras = [_map(p) for p in also_paths]
    offsets = [layout.slot_addr(i) + layout.SLOT_COUNTER for i in range(vcpus)]
    threshold = int(threshold_us * 1000)
    last = [max(_U64.unpack_from(m, o)[0] for m in (mem, *extras)) for o in offsets]
    changed = [time.monotonic_ns()] * vcpus
    stalls: list[tuple[int, int, int, int, int]] = []
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    unpack, clock, sleep = _U64.unpack_from, time.monotonic_ns, time.sleep
    interval = interval_us / 1e6
    check = 63 if interval else 1023  # look at stdin every few ms
    n = 0
    previous = clock()
    while True:
        now = clock()
        for i, off in enumerate(offsets):
            value = unpack(mem, off)[0]
            for extra in extras:  # none, unless also_paths
                value = max(value, unpack(extra, off)[0])
            if value != last[i]:
                # The stall ends at the previous sample, the last one that saw the old value:
                # if this process was itself descheduled since, that gap is ours, not the
                # guest's (on a busy host it would otherwise show up as a stall of every vCPU).
                if previous - changed[i] > threshold:
                    stalls.append((i, changed[i], previous, last[i], now))
                last[i] = value
                changed[i] = now
        previous = now
        n += 1
        if interval:
            sleep(interval)
        if n & check == 0 and sel.select(0):
            line = sys.stdin.readline()
            if not line:
                return
            print(json.dumps(stalls), flush=True)
            stalls = []


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


if __name__ == "__main__":
    _sample(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5:])
