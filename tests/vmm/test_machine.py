"""The VMM on real /dev/kvm: built-in guests run, pause parks every vCPU, memory is a memfd."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PATIENCE, needs_kvm, wait_advanced

from intrahost.vmm.config import parse_disk
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import DeviceDrainTimeout, Machine, MachineConfig, MachineConfigError
from intrahost.vmm.memory import GuestMemory, MemoryConfigError, MiB, parse_size, slot_layout
from intrahost.vmm.vcpu import PauseTimeout

pytestmark = needs_kvm


@pytest.fixture
def counter(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[Machine]:
    vcpus = getattr(request, "param", 1)
    config = MachineConfig(
        memory=64 * MiB,
        vcpus=vcpus,
        guest="counter",
        guest_args="progress=33554432",
        serial=f"file:{sockdir / 'serial.log'}",
    )
    machine = Machine.create(config)
    machine.start()
    yield machine
    machine.close()


def _counters(machine: Machine) -> list[int]:
    return [s.counter for s in layout.read_status(machine.memory.buffer).slots]


def _wait_counting(machine: Machine, timeout: float = PATIENCE) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = layout.read_status(machine.memory.buffer)
        except layout.GuestStatusMissing:
            time.sleep(0.02)
            continue
        if status.running == machine.config.vcpus and all(s.counter > 0 for s in status.slots):
            return [s.counter for s in status.slots]
        time.sleep(0.02)
    raise AssertionError(
        f"the guest did not start counting: {layout.read_status(machine.memory.buffer)}"
    )


def test_hello_prints_and_exits(sockdir: Path) -> None:
    serial = sockdir / "hello.log"
    machine = Machine.create(MachineConfig(memory=16 * MiB, guest="hello", serial=f"file:{serial}"))
    try:
        machine.start()
        assert machine.wait(PATIENCE), "hello did not end"
        assert machine.exit_code == 0
        report = machine.debug.reports[0]
        assert report.value == 0x48454C4C4F
    finally:
        machine.close()
    assert serial.read_text() == "Hello from intrahost\n"


@pytest.mark.parametrize("counter", [1, 4], indirect=True, ids=["1vcpu", "4vcpus"])
def test_counter_counts_on_every_vcpu(counter: Machine) -> None:
    first = _wait_counting(counter)
    wait_advanced(lambda: _counters(counter), first)


@pytest.mark.parametrize("counter", [1, 4], indirect=True, ids=["1vcpu", "4vcpus"])
def test_pause_parks_every_vcpu_and_freezes_the_counters(counter: Machine) -> None:
    _wait_counting(counter)
    counter.pause()
    assert counter.status == "paused"
    frozen = _counters(counter)
    time.sleep(0.3)
    assert _counters(counter) == frozen
    for i in range(counter.config.vcpus):
        layout.verify_region(counter.memory.buffer, i)
    counter.resume()
    assert counter.status == "running"
    wait_advanced(lambda: _counters(counter), frozen)


def test_counter_with_limit_reports_and_exits(sockdir: Path) -> None:
    serial = sockdir / "limit.log"
    config = MachineConfig(
        memory=32 * MiB,
        vcpus=2,
        guest="counter",
        guest_args="limit=1000000 progress=262144",
        serial=f"file:{serial}",
    )
    machine = Machine.create(config)
    try:
        machine.start()
        assert machine.wait(PATIENCE)
        assert machine.exit_code == 0
        for vcpu in range(2):
            assert (
                machine.debug.latest(layout.report_tag(layout.ReportTag.COUNTER, vcpu)) is not None
            )
        assert [s.counter for s in layout.read_status(machine.memory.buffer).slots] == [1000000] * 2
    finally:
        machine.close()
    text = serial.read_text()
    assert text.count("count=") >= 6 and text.rstrip().endswith("done")


def test_memory_is_a_sealed_memfd() -> None:
    with GuestMemory.create(16 * MiB) as mem:
        assert os.readlink(f"/proc/self/fd/{mem.fd}").startswith("/memfd:")
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.ftruncate(mem.fd, 8 * MiB)
        assert fcntl.fcntl(mem.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_memory_path_backs_guest_memory(sockdir: Path) -> None:
    path = sockdir / "ram"
    with GuestMemory.create(16 * MiB, str(path)) as mem:
        mem.view(0x1000, 4)[:] = b"ABCD"
        assert path.stat().st_size == 16 * MiB
        with path.open("rb") as f:
            f.seek(0x1000)
            assert f.read(4) == b"ABCD"


def test_memory_errors(sockdir: Path) -> None:
    with pytest.raises(MemoryConfigError, match="more than this host can back"):
        GuestMemory.create(1 << 50)
    with pytest.raises(MemoryConfigError, match="at least"):
        GuestMemory.create(4096)
    with pytest.raises(MemoryConfigError, match="cannot open memory file"):
        GuestMemory.create(16 * MiB, str(sockdir))
    with pytest.raises(MemoryConfigError, match="invalid size"):
        parse_size("lots")
    with pytest.raises(MachineConfigError):
        MachineConfig(vcpus=0)


def test_slot_layout_leaves_the_hole_below_4g() -> None:
    assert [(s.guest_phys_addr, s.size) for s in slot_layout(256 * MiB)] == [(0, 256 * MiB)]
    high = slot_layout(5 << 30)
    assert [(s.guest_phys_addr, s.size, s.file_offset) for s in high] == [
        (0, 3 << 30, 0),
        (4 << 30, 2 << 30, 3 << 30),
    ]


def test_a_device_that_does_not_drain_undoes_the_pause(sockdir: Path) -> None:
    """A device whose I/O thread is stuck in a request when the machine pauses: its state
    could still change during an export, so the pause fails (DeviceDrainTimeout, a
    PauseTimeout) and is undone: the vCPUs run again and the other devices serve again."""
    images = []
    for name in ("a.img", "b.img"):
        image = sockdir / name
        image.write_bytes(bytes(1 << 20))
        images.append(image)
    config = MachineConfig(
        memory=64 * MiB,
        guest="counter",
        guest_args="progress=33554432",
        serial="none",
        disks=tuple(parse_disk(f"path={p},id=d{i}", i) for i, p in enumerate(images)),
    )
    machine = Machine.create(config)
    try:
        machine.start()
        _wait_counting(machine)
        stuck, free = machine.virtio[1], machine.virtio[0]
        release = threading.Event()
        entered = threading.Event()

        def wedge() -> None:
            entered.set()
            release.wait(PATIENCE)

        stuck.io.call(wedge)
        assert entered.wait(PATIENCE)
        with pytest.raises(PauseTimeout, match=r"virtio-blk1 \(d1\) did not stop its I/O") as e:
            machine.pause(timeout=0.5)
        assert isinstance(e.value, DeviceDrainTimeout)
        assert machine.status == "running"
        assert not free.io.draining and not stuck.io.draining
        wait_advanced(lambda: _counters(machine), _counters(machine), "the guest counts again")
        release.set()
        machine.pause()  # now it drains
        assert machine.status == "paused"
        machine.resume()
    finally:
        machine.close()
