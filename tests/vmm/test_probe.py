"""The counter guest's probe: its status slots, its gap record and the pause it observed, on a
real guest; and the machine's own query, which no longer reads guest memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs_kvm

from intrahost.vmm.guests import layout
from intrahost.vmm.guests.probe import CounterProbe, DiskProbe, GuestNotCounting, host_tsc_khz
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

pytestmark = needs_kvm


@pytest.fixture
def counter(sockdir: Path) -> Iterator[Machine]:
    config = MachineConfig(
        memory=32 * MiB,
        vcpus=2,
        guest="counter",
        guest_args="progress=1073741824",
        memory_path=str(sockdir / "memory"),
        serial="none",
    )
    machine = Machine.create(config)
    machine.start()
    probe = CounterProbe(machine.memory.buffer)
    deadline = time.monotonic() + 20
    while (status := probe.status()) is None or not all(s.counter for s in status.slots):
        assert time.monotonic() < deadline, "the guest did not start counting"
        time.sleep(0.01)
    yield machine
    machine.close()


def test_counters_are_the_status_slots(counter: Machine) -> None:
    probe = CounterProbe(counter.memory.buffer)
    view = probe.counters()
    assert view is not None and [c["vcpu"] for c in view] == [0, 1]
    assert all(c["count"] > 0 and c["max-gap-ticks"] >= 0 for c in view)


def test_a_guest_without_a_status_page_has_no_view() -> None:
    probe = CounterProbe(bytearray(8 * MiB))
    assert probe.status() is None and probe.counters() is None
    probe.reset_gaps()  # nothing to reset: no error, nothing written


def test_the_machine_query_reads_no_guest_memory(counter: Machine) -> None:
    assert "counter" not in counter.query()


def test_the_observed_pause_is_the_gap_across_a_pause(counter: Machine, sockdir: Path) -> None:
    """Through the memory file, as the tests and benchmarks of other processes do."""
    with CounterProbe.open(sockdir / "memory", counter.features.tsc_khz) as probe:
        probe.reset_gaps()
        status = probe.status()
        assert status is not None
        t0 = time.monotonic()
        counter.pause()
        time.sleep(0.05)
        counter.resume()
        pause_us = probe.observed_pause_us(status)
        elapsed_us = (time.monotonic() - t0) * 1e6
    # At most the time since the reset, plus the vCPU's scheduling slack on this busy host
    # (it may have been preempted just before the pause).
    assert 50_000 <= pause_us <= elapsed_us + 50_000, (pause_us, elapsed_us)


def test_reset_gaps_forgets_older_gaps(counter: Machine) -> None:
    probe = CounterProbe(counter.memory.buffer)
    counter.pause()
    time.sleep(0.05)
    counter.resume()
    status = probe.status()
    assert status is not None
    deadline = time.monotonic() + 10
    while max(s.max_gap for s in status.slots) * 1000 // counter.features.tsc_khz < 50_000:
        assert time.monotonic() < deadline, "the guest did not record the pause"
        time.sleep(0.01)
        status = probe.status()
        assert status is not None
    probe.reset_gaps()
    status = probe.status()
    assert status is not None
    assert probe.observed_pause_us(status) < 50_000


def test_a_paused_guest_is_not_counting(counter: Machine) -> None:
    probe = CounterProbe(counter.memory.buffer, counter.features.tsc_khz)
    counter.pause()
    status = probe.status()
    assert status is not None
    with pytest.raises(GuestNotCounting, match="did not all count again"):
        probe.observed_pause_us(status, timeout=0.2)
    counter.resume()


def test_the_host_tsc_frequency_is_the_guests(counter: Machine) -> None:
    assert host_tsc_khz() == counter.features.tsc_khz


def test_reset_needs_a_writable_view(counter: Machine) -> None:
    probe = CounterProbe(bytes(counter.memory.buffer[: layout.STATUS_END]))
    with pytest.raises(layout.GuestLayoutError, match="writable"):
        probe.reset_gaps()


def test_the_disk_guest_without_a_disk_says_so() -> None:
    """Under this VMM (CPL0 emulated, CPL3 native) the disk guest boots, runs its C code at
    CPL3 and, given no virtio_mmio.device= entry, fails with NO_DEVICE in its status page."""
    config = MachineConfig(memory=16 * MiB, guest="disk", guest_args="limit=1", serial="none")
    machine = Machine.create(config)
    try:
        machine.start()
        assert machine.wait(timeout=20), "the disk guest did not end"
        assert machine.exit_code == layout.ExitCode.NO_DEVICE
        progress = DiskProbe(machine.memory.buffer).progress()
        assert progress is not None
        assert (progress["state"], progress["exit-code"]) == ("failed", layout.ExitCode.NO_DEVICE)
    finally:
        machine.close()


def _stall(machine: Machine, seconds: float) -> tuple[int, int]:
    """Pause the guest for about ``seconds``; (all parked, released) on CLOCK_MONOTONIC."""
    machine.pause()
    parked = time.monotonic_ns()
    time.sleep(seconds)
    released = time.monotonic_ns()
    machine.resume()
    return parked, released


def test_the_handoff_gap_is_the_one_across_the_pause_not_an_earlier_stall(
    counter: Machine,
) -> None:
    """The exact stopwatch: a longer stall just before (a busy host, a command starting up)
    is not taken for the pause, and nothing is written to guest memory."""
    probe = CounterProbe(counter.memory.buffer)
    clock = probe.calibrate()
    assert clock.khz == probe.tsc_khz
    before = bytes(counter.memory.buffer[layout.STATUS_ADDR : layout.GAPS_END])
    window_start = time.monotonic_ns()
    _stall(counter, 0.3)  # the earlier, longer stall
    _wait_counting(probe)
    parked, released = _stall(counter, 0.01)
    pause_us = probe.handoff_gap_us(parked, released)
    # (the upper bound leaves room for a busy host's wake-up latency)
    assert 10_000 <= pause_us < 250_000, pause_us
    assert probe.largest_gap_us(window_start, released) >= 300_000
    assert probe.largest_gap_us(parked, released) == pause_us
    assert bytes(counter.memory.buffer[layout.STATUS_ADDR : layout.GAPS_END]) != before


def _wait_counting(probe: CounterProbe) -> None:
    """Until every vCPU counted again (ran after a resume)."""
    status = probe.status()
    assert status is not None
    probe.observed_pause_us(status)


def test_the_gap_ring_holds_the_latest_large_gaps_in_order(counter: Machine) -> None:
    probe = CounterProbe(counter.memory.buffer)
    for _ in range(3):
        _stall(counter, 0.002)
        _wait_counting(probe)
    for vcpu in range(2):
        gaps = layout.read_gaps(counter.memory.buffer, vcpu)
        assert 3 <= len(gaps) <= layout.GAP_ENTRIES
        assert all(g.ticks > layout.GAP_MIN_TICKS for g in gaps)
        assert [g.end for g in gaps] == sorted(g.end for g in gaps)
        assert layout.read_slot(counter.memory.buffer, vcpu).gaps_recorded >= len(gaps)


def test_the_handoff_gap_needs_a_calibration(counter: Machine) -> None:
    from intrahost.vmm.guests.probe import GapNotFound

    with pytest.raises(GapNotFound, match="calibrate"):
        CounterProbe(counter.memory.buffer).handoff_gap_us(0, 1)
