"""The built-in guests seen through their memory: the counter guest's status slots, its gap
record and the pause it observed (:class:`CounterProbe`); the disk guest's progress and its
view of the writes it saw complete (:class:`DiskProbe`); the net guest's counters
(:class:`NetProbe`, which only reads).

For the control API's ``query-vm`` (the service adds :meth:`CounterProbe.counters` to what the
machine reports), the tests and the benchmarks. Nothing on a hand-off's path uses it: a VMM
never reads or writes guest memory to hand a guest off.

The counter guest keeps, per vCPU, the largest gap between two consecutive RDTSCs of its loop
(``max_gap``, in TSC ticks), and a ring of its latest large gaps with the RDTSC that ended
each. A pause of the guest — a hand-off's blackout — shows there as the guest itself saw it.

The exact stopwatch picks, in each vCPU's ring, the gap that spans the hand-off: the one that
began before the source had parked every vCPU and ended after the destination released them
(the VMM's breakdown gives both on CLOCK_MONOTONIC: ``paused_at_ns`` + ``pause_us``, and
``resumed_at_ns``). Guest TSC and CLOCK_MONOTONIC are related by a line calibrated from the
guest's live ``last_tsc`` (:meth:`CounterProbe.calibrate`, while the guest runs) and the TSC
frequency; nothing is written to guest memory, and stalls before or after the hand-off (a
busy host, a command starting up) are not taken for it::

    probe.calibrate()                                  # the guest runs
    ...                                                # the hand-off; its breakdown
    pause_us = probe.handoff_gap_us(parked_at_ns, resumed_at_ns)

Where no such times exist (another VMM), :meth:`CounterProbe.largest_gap_us` takes the largest
gap that overlaps a window (the command's start to its end). The older way, which counts every
stall since a reset::

    probe.reset_gaps()                          # forget older gaps: a write to guest memory
    before = probe.status()
    ...                                         # the hand-off
    pause_us = probe.observed_pause_us(before)  # once every vCPU counted again

Resetting races harmlessly with the running guest: it re-reads the word every iteration. The
probe works on any view of guest RAM in which guest-physical address ``A`` is at index ``A``:
the VMM's own mapping, or a mapping of the memory file (a /dev/shm file given with
``--memory-path``, or a VMM's memfd as ``/proc/PID/fd/N``) made with :meth:`CounterProbe.open`.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.layout import (
    CounterStatus,
    DiskState,
    DiskStatus,
    GuestStatusMissing,
    NetState,
    NetStatus,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from intrahost.vmm.guests.diskcheck import GuestView


class GuestNotCounting(IntrahostError):
    """The counter guest's vCPUs did not all count again in time (it is paused, stopped or
    handed to a VMM that does not run it)."""


class GapNotFound(IntrahostError):
    """No recorded gap of the guest spans the hand-off (the ring was overwritten: read it
    sooner; or the times are not this hand-off's)."""


@dataclass(frozen=True)
class TscClock:
    """Guest TSC = ``tsc_at_zero`` + CLOCK_MONOTONIC ns x ``khz`` / 10^6 (calibrated).
    ``error_ticks``: the spread of the calibration samples' bounds."""

    tsc_at_zero: int
    khz: int
    error_ticks: int

    def tsc(self, monotonic_ns: int) -> int:
        return self.tsc_at_zero + monotonic_ns * self.khz // 1_000_000

    def monotonic_ns(self, tsc: int) -> int:
        return (tsc - self.tsc_at_zero) * 1_000_000 // self.khz


@dataclass(frozen=True)
class HandoffGap:
    """The guest's gap across a hand-off: ``us`` long, from its last RDTSC on the source
    (``start_ns``) to its first on the destination (``end_ns``), CLOCK_MONOTONIC."""

    us: float
    start_ns: int
    end_ns: int


class CounterProbe(Closeable):
    """The counter guest in ``memory``. ``tsc_khz``: the guest's TSC frequency, to turn gaps
    into microseconds (default: KVM's, asked of a new VM when first needed)."""

    def __init__(self, memory: WriteableBuffer, tsc_khz: int | None = None) -> None:
        self.memory = memory
        self._tsc_khz = tsc_khz
        self._map: mmap.mmap | None = None
        self.clock: TscClock | None = None

    @classmethod
    def open(cls, path: str | Path, tsc_khz: int | None = None) -> CounterProbe:
        """A probe on a mapping of the guest's memory file (writable, for
        :meth:`reset_gaps`); :meth:`close` unmaps it."""
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, layout.GAPS_END, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        probe = cls(mapping, tsc_khz)
        probe._map = mapping
        return probe

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    @property
    def tsc_khz(self) -> int:
        if self._tsc_khz is None:
            self._tsc_khz = host_tsc_khz()
        return self._tsc_khz

    def status(self) -> CounterStatus | None:
        """The status page; None if memory holds none (not started yet, or another guest)."""
        try:
            return layout.read_status(self.memory)
        except GuestStatusMissing:
            return None

    def counters(self) -> list[dict[str, Any]] | None:
        """``query-vm``'s ``counter`` member: per vCPU its count and largest gap (ticks)."""
        status = self.status()
        if status is None:
            return None
        return [
            {"vcpu": i, "count": s.counter, "max-gap-ticks": s.max_gap}
            for i, s in enumerate(status.slots)
        ]

    def reset_gaps(self) -> None:
        """Zero every vCPU's largest gap, so that the next one it records is the pause to
        measure. Does nothing before the guest wrote its status page."""
        status = self.status()
        if status is None:
            return
        for vcpu in range(len(status.slots)):
            layout.reset_max_gap(self.memory, vcpu)

    def observed_pause_us(self, before: CounterStatus, timeout: float = 10.0) -> float:
        """The largest gap any vCPU recorded since :meth:`reset_gaps`, in µs, read once every
        vCPU's counter has moved past ``before`` (the guest ran again after the pause);
        :class:`GuestNotCounting` if they do not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            now = layout.read_status(self.memory)
            if all(a.counter != b.counter for a, b in zip(before.slots, now.slots, strict=True)):
                break
            if time.monotonic() > deadline:
                raise GuestNotCounting(
                    f"the counter guest's vCPUs did not all count again within {timeout} s: "
                    f"{[s.counter for s in before.slots]} -> {[s.counter for s in now.slots]}"
                )
            time.sleep(0.001)
        gap = max(s.max_gap for s in layout.read_status(self.memory).slots)
        return round(gap * 1000 / self.tsc_khz, 1)

    # --- the exact stopwatch -----------------------------------------------------------------

    def calibrate(self, samples: int = 200, duration: float = 0.02) -> TscClock:
        """Relate guest TSC and CLOCK_MONOTONIC while the guest runs: each sample bounds
        the line from below (a ``last_tsc`` read before ``t`` was stamped at or before
        ``t``); the freshest sample, the highest bound, is the line."""
        khz = self.tsc_khz
        vcpus = range(self._vcpus())
        best: int | None = None
        lowest: int | None = None
        pause = duration / samples
        for _ in range(samples):
            for vcpu in vcpus:
                stamp = layout.read_slot(self.memory, vcpu).last_tsc
                bound = stamp - time.monotonic_ns() * khz // 1_000_000
                best = bound if best is None else max(best, bound)
                lowest = bound if lowest is None else min(lowest, bound)
            time.sleep(pause)
        assert best is not None and lowest is not None
        self.clock = TscClock(best, khz, best - lowest)
        return self.clock

    def handoff_gap_us(self, parked_at_ns: int, resumed_at_ns: int, timeout: float = 10.0) -> float:
        """The longest of the vCPUs' gaps that span the hand-off (they began before
        ``parked_at_ns``, when every source vCPU was parked, and ended after
        ``resumed_at_ns``, when the destination released them), in µs. Waits until every
        vCPU ran again; :class:`GapNotFound` if a vCPU's ring holds no such gap."""
        return self.handoff_gap(parked_at_ns, resumed_at_ns, timeout).us

    def handoff_gap(
        self, parked_at_ns: int, resumed_at_ns: int, timeout: float = 10.0
    ) -> HandoffGap:
        """:meth:`handoff_gap_us` with where the longest gap lies on CLOCK_MONOTONIC (to
        split it: before the pause began, the VMMs' steps, after the release)."""
        clock = self.clock
        if clock is None:
            raise GapNotFound("calibrate() the probe while the guest runs, before the hand-off")
        # Each vCPU's stall across the hand-off is the gap that overlaps the interval from
        # the park to the release the most (gaps of one vCPU never overlap each other). The
        # calibrated line is within microseconds (its freshest sample); a gap still counts
        # if it misses the interval by less than 100 µs.
        slack = clock.khz // 10
        parked, resumed = clock.tsc(parked_at_ns), clock.tsc(resumed_at_ns)
        self._wait_past(resumed + slack, timeout)
        longest: layout.Gap | None = None
        for vcpu in range(self._vcpus()):
            gaps = _unwrapped(layout.read_gaps(self.memory, vcpu), parked, vcpu)
            overlap = [(min(g.end, resumed) - max(g.start, parked), g) for g in gaps]
            best = max(overlap, default=None, key=lambda pair: pair[0])
            if best is None or best[0] < -slack:
                raise GapNotFound(
                    f"vCPU {vcpu}: no recorded gap spans the hand-off (parked at "
                    f"{parked_at_ns} ns, resumed at {resumed_at_ns} ns; {len(gaps)} gaps)"
                )
            if longest is None or best[1].ticks > longest.ticks:
                longest = best[1]
        assert longest is not None
        return HandoffGap(
            round(longest.ticks * 1000 / clock.khz, 1),
            clock.monotonic_ns(longest.start),
            clock.monotonic_ns(longest.end),
        )

    def largest_gap_us(self, from_ns: int, to_ns: int, timeout: float = 10.0) -> float:
        """The longest gap of any vCPU that overlaps [``from_ns``, ``to_ns``] (for a VMM
        that gives no pause times: the window of the command that paused the guest), in
        µs; 0 if none of the large gaps does."""
        clock = self.clock
        if clock is None:
            raise GapNotFound("calibrate() the probe while the guest runs, before the hand-off")
        start, end = clock.tsc(from_ns), clock.tsc(to_ns)
        self._wait_past(end, timeout)
        longest = 0
        for vcpu in range(self._vcpus()):
            for g in _unwrapped(layout.read_gaps(self.memory, vcpu), start, vcpu):
                if g.end >= start and g.start <= end:
                    longest = max(longest, g.ticks)
        return round(longest * 1000 / clock.khz, 1)

    def _vcpus(self) -> int:
        status = self.status()
        if status is None:
            raise GuestNotCounting("the counter guest has not written its status page yet")
        return len(status.slots)

    def _wait_past(self, tsc: int, timeout: float) -> None:
        """Until every vCPU stamped a TSC past ``tsc`` (it ran after that moment)."""
        deadline = time.monotonic() + timeout
        while True:
            stamps = [s.last_tsc for s in layout.read_status(self.memory).slots]
            if all(stamp > tsc for stamp in stamps):
                return
            if time.monotonic() > deadline:
                raise GuestNotCounting(
                    f"the counter guest's vCPUs did not all run again within {timeout} s"
                )
            time.sleep(0.001)


def _unwrapped(gaps: list[layout.Gap], since: int, vcpu: int) -> list[layout.Gap]:
    """``gaps`` if the ring still reaches back to the TSC ``since``; GapNotFound if it was
    overwritten past it (read sooner)."""
    if len(gaps) == layout.GAP_ENTRIES and gaps[0].start > since:
        raise GapNotFound(
            f"vCPU {vcpu}: its gap ring was overwritten since the hand-off (a busy host stops "
            f"the guest often: read the gap sooner after the hand-off)"
        )
    return gaps


def host_tsc_khz() -> int:
    """KVM's TSC frequency for a new VM on this host: that of every guest here."""
    from intrahost.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        return vm.get_tsc_khz()


def _device_guest_progress(
    states: type[DiskState] | type[NetState], status: DiskStatus | NetStatus
) -> dict[str, Any]:
    """The members ``query-vm``'s entry for a C guest (disk, net) starts with: its state's
    name (the number if it is none of ``states``), its exit code and its device's base."""
    try:
        state = states(status.state).name.lower()
    except ValueError:
        state = str(status.state)
    return {"state": state, "exit-code": status.exit_code, "device-base": status.device_base}


class DiskProbe:
    """The disk guest in ``memory`` (any view of guest RAM, see the module docstring), for
    ``query-vm``'s ``disk`` member, the tests and the image check (:mod:`.diskcheck`)."""

    def __init__(self, memory: ReadableBuffer) -> None:
        self.memory = memory

    def status(self) -> DiskStatus | None:
        """The status page; None if memory holds none (not started yet, or another guest)."""
        try:
            return layout.read_disk_status(self.memory)
        except GuestStatusMissing:
            return None

    def progress(self) -> dict[str, Any] | None:
        """``query-vm``'s ``disk`` member: the workload's counters."""
        status = self.status()
        if status is None:
            return None
        return {
            **_device_guest_progress(DiskState, status),
            "blocks": status.blocks,
            "generation": status.generation,
            "writes-submitted": status.writes_submitted,
            "writes-completed": status.writes_completed,
            "reads-verified": status.reads_completed,
            "verify-failures": status.verify_failures,
            "flushes": status.flushes,
            "io-errors": status.io_errors,
            "last-seq": status.max_completed,
            "durable-seq": status.durable,
            "duplicates": status.duplicates,
            "max-completion-gap-ticks": status.max_completion_gap,
            "max-loop-gap-ticks": status.max_loop_gap,
        }

    def reset_gaps(self) -> None:
        """Zero the guest's largest gaps between completions and between turns of its loop,
        so that the next ones it records are the pause to measure (needs a writable view)."""
        layout.reset_disk_gaps(self.memory)

    def gaps_us(self, tsc_khz: int) -> tuple[float, float]:
        """The largest gap between two completions the guest saw (the I/O blackout) and
        between two turns of its loop (its vCPU's stall), in µs, since :meth:`reset_gaps`."""
        status = layout.read_disk_status(self.memory)
        return (
            round(status.max_completion_gap * 1000 / tsc_khz, 1),
            round(status.max_loop_gap * 1000 / tsc_khz, 1),
        )

    def view(self) -> GuestView:
        """What the guest saw complete, for :func:`~intrahost.vmm.guests.diskcheck.check_image`.

        Read it from a paused or stopped guest (see :meth:`GuestView.from_memory`)."""
        from intrahost.vmm.guests.diskcheck import GuestView  # only the disk checks need it

        return GuestView.from_memory(self.memory)


class NetProbe(Closeable):
    """The net guest in ``memory`` (any view of guest RAM, see the module docstring; a
    read-only one is enough), for ``query-vm``'s ``net`` member and the tests. It never writes
    to guest memory."""

    def __init__(self, memory: ReadableBuffer) -> None:
        self.memory = memory
        self._map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | Path) -> NetProbe:
        """A probe on a read-only mapping of the guest's memory file (its ``--memory-path``
        file, or ``/proc/PID/fd/N``); :meth:`close` unmaps it."""
        fd = os.open(path, os.O_RDONLY)
        try:
            mapping = mmap.mmap(
                fd, layout.NET_STATUS_ADDR + layout.NET_STATUS_SIZE, prot=mmap.PROT_READ
            )
        finally:
            os.close(fd)
        probe = cls(mapping)
        probe._map = mapping
        return probe

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def status(self) -> NetStatus | None:
        """The status page; None if memory holds none (not started yet, or another guest)."""
        try:
            return layout.read_net_status(self.memory)
        except GuestStatusMissing:
            return None

    def progress(self) -> dict[str, Any] | None:
        """``query-vm``'s ``net`` member: the guest's address and its counters."""
        status = self.status()
        if status is None:
            return None
        return {
            **_device_guest_progress(NetState, status),
            "address": status.address,
            "mac": status.mac_address,
            "heartbeat": status.heartbeat,
            "frames-in": status.frames_in,
            "frames-out": status.frames_out,
            "arp-replies": status.arp_replies,
            "icmp-echoes": status.icmp_echoes,
            "udp-echoes": status.udp_echoes,
            "dropped": status.dropped,
            "errors": status.errors,
            "rx-kicks": status.rx_kicks,
            "tx-kicks": status.tx_kicks,
            "duplicates": status.duplicates,
            "max-loop-gap-ticks": status.max_loop_gap,
        }
