"""The built-in guests seen through their memory: the counter guest's status slots, its gap
record and the pause it observed (:class:`CounterProbe`); the disk guest's progress and its
view of the writes it saw complete (:class:`DiskProbe`); the net guest's counters
(:class:`NetProbe`, which only reads).

For the control API's ``query-vm`` (the service adds :meth:`CounterProbe.counters` to what the
machine reports), the tests and the benchmarks. Nothing on a hand-off's path uses it: a VMM
never reads or writes guest memory to hand a guest off.

The counter guest keeps, per vCPU, the largest gap between two consecutive RDTSCs of its loop
(``max_gap``, in TSC ticks). A pause of the guest — a hand-off's blackout — shows there as the
guest itself saw it. To measure one pause, in this order::

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from types import TracebackType

    from _typeshed import ReadableBuffer, WriteableBuffer

    from intrahost.vmm.guests.diskcheck import GuestView


class GuestNotCounting(IntrahostError):
    """The counter guest's vCPUs did not all count again in time (it is paused, stopped or
    handed to a VMM that does not run it)."""


class CounterProbe:
    """The counter guest in ``memory``. ``tsc_khz``: the guest's TSC frequency, to turn gaps
    into microseconds (default: KVM's, asked of a new VM when first needed)."""

    def __init__(self, memory: WriteableBuffer, tsc_khz: int | None = None) -> None:
        self.memory = memory
        self._tsc_khz = tsc_khz
        self._map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | Path, tsc_khz: int | None = None) -> CounterProbe:
        """A probe on a mapping of the guest's memory file (writable, for
        :meth:`reset_gaps`); :meth:`close` unmaps it."""
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, layout.STATUS_END, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        probe = cls(mapping, tsc_khz)
        probe._map = mapping
        return probe

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> CounterProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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


def host_tsc_khz() -> int:
    """KVM's TSC frequency for a new VM on this host: that of every guest here."""
    from intrahost.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        return vm.get_tsc_khz()


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
        try:
            state = DiskState(status.state).name.lower()
        except ValueError:
            state = str(status.state)
        return {
            "state": state,
            "exit-code": status.exit_code,
            "device-base": status.device_base,
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


class NetProbe:
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

    def __enter__(self) -> NetProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        try:
            state = NetState(status.state).name.lower()
        except ValueError:
            state = str(status.state)
        return {
            "state": state,
            "exit-code": status.exit_code,
            "device-base": status.device_base,
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
