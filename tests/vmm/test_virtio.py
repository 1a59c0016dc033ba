"""The virtio-mmio transport and split virtqueues, driven by the test driver through the
device's MMIO handlers (no VM needed: guest memory is a memfd mapping)."""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing
import os
import select
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import Buf, Driver

from intrahost.vmm.devices.virtio.mmio import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FEATURES_OK,
    INT_CONFIG,
    INT_VRING,
    MAGIC,
    VENDOR_ID,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Reg,
    VirtioMmioDevice,
)
from intrahost.vmm.devices.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Chain,
    QueueError,
    SplitQueue,
    VirtioStateError,
)
from intrahost.vmm.memory import GuestMemory, MiB
from intrahost.vmm.persist import Parts

BASE = 0xD000_0000
DATA = 0x100000
ALL = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX


class Echo:
    """A test backend: copies what the driver gave into what it lets the device write."""

    device_id = 42
    features = 1 << 3
    queue_count = 1

    def __init__(self) -> None:
        self.handled = 0

    def config_space(self) -> bytes:
        return bytes(range(1, 25))

    def handle(self, queue: int, chain: Chain) -> int:
        self.handled += 1
        data = b"".join(bytes(b) for b in chain.readable)
        if data.startswith(b"BAD"):
            raise QueueError("a malformed request")
        at = 0
        for b in chain.writable:
            n = min(len(b), len(data) - at)
            if n <= 0:
                break
            b[:n] = data[at : at + n]
            at += n
        return at

    def host_fds(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.create(16 * MiB) as m:
        yield m


def make(mem: GuestMemory, backend: Echo | None = None) -> VirtioMmioDevice:
    return VirtioMmioDevice(backend or Echo(), mem, BASE, 5, "virtio-test")


@pytest.fixture
def dev(mem: GuestMemory) -> Iterator[VirtioMmioDevice]:
    d = make(mem)
    yield d
    d.close()


def irq_count(dev: VirtioMmioDevice) -> int:
    try:
        return os.eventfd_read(dev.irq_fd)
    except BlockingIOError:
        return 0


def echo_chain(drv: Driver, payload: bytes, at: int = DATA, out: int = DATA + 0x1000) -> int:
    drv.mem.view(at, len(payload))[:] = payload
    return drv.add([Buf(at, len(payload)), Buf(out, len(payload), write=True)])


# --- registers ---------------------------------------------------------------------------------


def test_identity_registers(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    assert drv.read(Reg.MAGIC_VALUE) == MAGIC == 0x74726976
    assert drv.read(Reg.VERSION) == 2
    assert drv.read(Reg.DEVICE_ID) == 42
    assert drv.read(Reg.VENDOR_ID) == VENDOR_ID == 0x48544E49
    assert drv.device_features() == ALL | Echo.features
    drv.write(Reg.DEVICE_FEATURES_SEL, 2)
    assert drv.read(Reg.DEVICE_FEATURES) == 0
    drv.write(Reg.QUEUE_SEL, 0)
    assert drv.read(Reg.QUEUE_NUM_MAX) == MAX_QUEUE_SIZE
    drv.write(Reg.QUEUE_SEL, 1)  # no such queue
    assert drv.read(Reg.QUEUE_NUM_MAX) == 0
    assert drv.read(Reg.SHM_LEN_LOW) == drv.read(Reg.SHM_LEN_HIGH) == 0xFFFF_FFFF
    assert drv.read(Reg.CONFIG_GENERATION) == 0


def test_config_space_reads_any_width(dev: VirtioMmioDevice) -> None:
    assert dev.mmio_read(BASE + 0x100, 1) == 1
    assert dev.mmio_read(BASE + 0x101, 2) == 0x0302
    assert dev.mmio_read(BASE + 0x100, 8) == int.from_bytes(bytes(range(1, 9)), "little")
    assert dev.mmio_read(BASE + 0x100 + 23, 4) == 24  # past the end reads zeros
    dev.mmio_write(BASE + 0x100, 4, 0xFFFF_FFFF)  # ignored
    assert dev.mmio_read(BASE + 0x100, 1) == 1


def test_narrow_register_access_is_ignored(
    dev: VirtioMmioDevice, caplog: pytest.LogCaptureFixture
) -> None:
    assert dev.mmio_read(BASE + Reg.MAGIC_VALUE, 2) == 0
    dev.mmio_write(BASE + Reg.STATUS, 1, 1)
    assert dev.mmio_read(BASE + Reg.STATUS, 4) == 0
    assert "registers are 32-bit" in caplog.text


# --- feature negotiation -------------------------------------------------------------------------


def test_version_1_is_required(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    assert not drv.negotiate(VIRTIO_RING_F_EVENT_IDX)
    assert not drv.negotiate(ALL | 1 << 40)  # not offered
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    assert dev.driver_features == VIRTIO_F_VERSION_1


def test_features_frozen_after_features_ok(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.write(Reg.DRIVER_FEATURES_SEL, 0)
    drv.write(Reg.DRIVER_FEATURES, VIRTIO_RING_F_EVENT_IDX)
    assert dev.driver_features == VIRTIO_F_VERSION_1


def test_driver_ok_without_features_ok_breaks(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    assert not drv.negotiate(0)
    drv.setup_queue()
    drv.write(Reg.STATUS, drv.read(Reg.STATUS) | DRIVER_OK)
    assert drv.read(Reg.STATUS) & DEVICE_NEEDS_RESET
    assert drv.read(Reg.INTERRUPT_STATUS) == INT_CONFIG


def test_reset_clears_everything(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start()
    echo_chain(drv, b"x")
    dev.process(0)
    assert drv.read(Reg.INTERRUPT_STATUS) == INT_VRING
    drv.write(Reg.STATUS, 0)
    assert drv.read(Reg.STATUS) == 0
    assert drv.read(Reg.INTERRUPT_STATUS) == 0
    assert drv.read(Reg.QUEUE_READY) == 0
    assert not dev.queues[0].active


# --- processing ----------------------------------------------------------------------------------


def test_echo_request_and_interrupt(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    head = echo_chain(drv, b"hello virtio")
    dev.process(0)
    assert drv.take_used() == [(head, 12)]
    assert bytes(mem.view(DATA + 0x1000, 12)) == b"hello virtio"
    assert drv.read(Reg.INTERRUPT_STATUS) == INT_VRING
    assert irq_count(dev) == 1
    drv.write(Reg.INTERRUPT_ACK, INT_VRING)
    assert drv.read(Reg.INTERRUPT_STATUS) == 0
    assert drv.used_flags() == 0  # notifications are on again after the batch


def test_a_batch_is_published_once_with_one_interrupt(
    dev: VirtioMmioDevice, mem: GuestMemory
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    heads = [
        echo_chain(drv, bytes([i]) * 8, DATA + 0x100 * i, DATA + 0x8000 + 0x100 * i)
        for i in range(16)
    ]
    dev.process(0)
    assert [h for h, _ in drv.take_used()] == heads
    assert irq_count(dev) == 1


def test_no_interrupt_flag_suppresses_the_interrupt(
    dev: VirtioMmioDevice, mem: GuestMemory
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    echo_chain(drv, b"q")
    dev.process(0)
    assert len(drv.take_used()) == 1
    assert irq_count(dev) == 0


def test_event_idx(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start(ALL)
    drv.set_used_event(1)  # interrupt when used idx passes 1
    echo_chain(drv, b"a")
    dev.process(0)
    assert irq_count(dev) == 0  # used idx 1: not past used_event
    assert drv.avail_event() == 1  # the device wants a notification for entry 1
    echo_chain(drv, b"b")
    dev.process(0)
    assert irq_count(dev) == 1
    assert drv.avail_event() == 2
    assert drv.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0


def test_queue_notify_through_the_io_thread(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    dev.start()
    head = echo_chain(drv, b"thread")
    drv.write(Reg.QUEUE_NOTIFY, 0)  # no VM: the write reaches the handler, which kicks
    deadline = time.monotonic() + 10
    while drv.used_idx() != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert drv.take_used() == [(head, 6)]
    drv.write(Reg.QUEUE_NOTIFY, 7)  # no such queue: ignored


@pytest.mark.parametrize("start", [65533, 65535])
def test_indexes_wrap_at_65535(mem: GuestMemory, start: int) -> None:
    dev = make(mem)
    try:
        drv = Driver(dev, mem, size=8)
        drv.start(ALL)
        # Continue a queue whose indexes are near the wrap, as after a long run.
        q = dev.queues[0]
        q.next_avail = q.next_used = start
        q.deactivate()
        q.activate(mem, event_idx=True, indirect=True)
        drv.avail_idx = drv.used_seen = start
        struct.pack_into("<H", mem.view(drv.avail + 2, 2), 0, start)
        struct.pack_into("<H", mem.view(drv.used + 2, 2), 0, start)
        heads = [echo_chain(drv, bytes([i])) for i in range(6)]
        dev.process(0)
        assert [h for h, _ in drv.take_used()] == heads
        assert drv.used_idx() == (start + 6) & 0xFFFF
        heads = [echo_chain(drv, bytes([i])) for i in range(8)]  # a full ring
        dev.process(0)
        assert [h for h, _ in drv.take_used()] == heads
        assert not dev.broken
    finally:
        dev.close()


def test_a_long_run_wraps_the_indexes(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem, size=16)
    drv.start(VIRTIO_F_VERSION_1)
    mem.view(DATA, 1)[:] = b"z"
    total = 0
    while total < 65536 + 40:
        for _ in range(16):
            drv.add([Buf(DATA, 1), Buf(DATA + 0x1000, 1, write=True)])
        dev.process(0)
        assert len(drv.take_used()) == 16
        total += 16
    assert drv.used_idx() == total & 0xFFFF
    assert not dev.broken


def test_indirect_chain(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start(ALL)
    mem.view(DATA, 6)[:] = b"abcdef"
    bufs = [
        Buf(DATA, 3),
        Buf(DATA + 3, 3),
        Buf(DATA + 0x1000, 2, True),
        Buf(DATA + 0x2000, 4, True),
    ]
    head = drv.add(bufs, indirect_at=0x40000)
    dev.process(0)
    assert drv.take_used() == [(head, 6)]
    assert bytes(mem.view(DATA + 0x1000, 2)) + bytes(mem.view(DATA + 0x2000, 4)) == b"abcdef"


# --- malformed queues and chains ---------------------------------------------------------------


def expect_broken(
    dev: VirtioMmioDevice, drv: Driver, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    with caplog.at_level(logging.ERROR):
        dev.process(0)
    assert drv.read(Reg.STATUS) & DEVICE_NEEDS_RESET
    assert drv.read(Reg.INTERRUPT_STATUS) & INT_CONFIG
    assert text in caplog.text
    assert "DEVICE_NEEDS_RESET" in caplog.text


def test_indirect_without_negotiation_breaks(
    dev: VirtioMmioDevice, mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    drv.add([Buf(DATA, 4)], indirect_at=0x40000)
    expect_broken(dev, drv, caplog, "without VIRTIO_RING_F_INDIRECT_DESC")


def test_loop_breaks(
    dev: VirtioMmioDevice, mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    drv = Driver(dev, mem, size=8)
    drv.start(VIRTIO_F_VERSION_1)
    drv.put_desc(drv.desc, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    drv.put_desc(drv.desc, 1, DATA, 4, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0)
    expect_broken(dev, drv, caplog, "a loop?")


@pytest.mark.parametrize(
    ("desc", "text"),
    [
        ((3 << 30, 16, 0, 0), "is not RAM"),  # in the hole below 4 GiB
        ((16 * MiB - 8, 16, 0, 0), "is not RAM"),  # across the end of RAM
        ((2**64 - 8, 16, 0, 0), "is not RAM"),
        ((DATA, 4, VIRTQ_DESC_F_NEXT, 300), "next index 300"),
        ((DATA, 32, VIRTQ_DESC_F_INDIRECT, 0), "must not"),  # not negotiated → see below
    ],
)
def test_bad_descriptors_break(
    dev: VirtioMmioDevice,
    mem: GuestMemory,
    caplog: pytest.LogCaptureFixture,
    desc: tuple[int, int, int, int],
    text: str,
) -> None:
    drv = Driver(dev, mem)
    drv.start(ALL)
    addr, length, flags, nxt = desc
    if flags & VIRTQ_DESC_F_INDIRECT:
        flags |= VIRTQ_DESC_F_NEXT  # INDIRECT with NEXT is forbidden
        text = "must not have NEXT"
    drv.put_desc(drv.desc, 0, addr, length, flags, nxt)
    drv.publish(0)
    expect_broken(dev, drv, caplog, text)


def test_readable_after_writable_breaks(
    dev: VirtioMmioDevice, mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    drv.add([Buf(DATA, 4, write=True), Buf(DATA + 8, 4)])
    expect_broken(dev, drv, caplog, "device-readable buffer after a device-writable")


def test_head_out_of_range_and_index_jump_break(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    for setup, text in (
        (lambda drv: drv.publish(999), "head index 999"),
        (lambda drv: struct.pack_into("<H", mem.view(drv.avail + 2, 2), 0, 300), "jumped"),
    ):
        dev = make(mem)
        try:
            drv = Driver(dev, mem)
            drv.start(VIRTIO_F_VERSION_1)
            setup(drv)
            expect_broken(dev, drv, caplog, text)
        finally:
            dev.close()


@pytest.mark.parametrize(
    ("reg", "value", "text"),
    [
        (Reg.QUEUE_NUM, 100, "not a power of 2"),
        (Reg.QUEUE_NUM, 512, "not a power of 2"),
        (Reg.QUEUE_DESC_LOW, 0x10008, "misaligned"),
        (Reg.QUEUE_DEVICE_HIGH, 0x1, "is not RAM"),
    ],
)
def test_bad_queue_setup_breaks_at_driver_ok(
    dev: VirtioMmioDevice,
    mem: GuestMemory,
    caplog: pytest.LogCaptureFixture,
    reg: int,
    value: int,
    text: str,
) -> None:
    drv = Driver(dev, mem)
    assert drv.negotiate()
    drv.write(Reg.QUEUE_SEL, 0)
    drv.setup_queue()
    drv.write(Reg.QUEUE_READY, 0)
    drv.write(reg, value)
    drv.write(Reg.QUEUE_READY, 1)
    with caplog.at_level(logging.ERROR):
        drv.write(Reg.STATUS, drv.read(Reg.STATUS) | DRIVER_OK)
    assert drv.read(Reg.STATUS) & DEVICE_NEEDS_RESET
    assert text in caplog.text


def test_malformed_request_breaks_and_reset_recovers(
    dev: VirtioMmioDevice, mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    good = echo_chain(drv, b"ok")
    echo_chain(drv, b"BAD", DATA + 0x100)
    expect_broken(dev, drv, caplog, "a malformed request")
    assert drv.take_used() == [(good, 2)]  # what completed before is published
    echo_chain(drv, b"later")
    dev.process(0)
    assert drv.take_used() == []  # broken: nothing more
    drv2 = Driver(dev, mem)
    drv2.start(VIRTIO_F_VERSION_1)
    assert drv2.read(Reg.STATUS) & (DEVICE_NEEDS_RESET | DRIVER_OK) == DRIVER_OK
    head = echo_chain(drv2, b"again")
    dev.process(0)
    assert drv2.take_used() == [(head, 5)]


def test_queue_registers_frozen_while_live(dev: VirtioMmioDevice, mem: GuestMemory) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    drv.write(Reg.QUEUE_DESC_LOW, 0x5000)
    assert dev.queues[0].desc == drv.desc


# --- random chains (the guest is not trusted) -----------------------------------------------------

SIZE = 8
TABLE = 0x10000
INDIRECT = 0x30000
AREA = 0x40000  # everything the random chains may point at lies below, or far outside RAM

addresses = st.one_of(
    st.integers(0x20000, AREA - 1),
    st.sampled_from([3 << 30, 16 * MiB - 4, 2**64 - 16, 2**63]),
)
descriptors = st.tuples(
    addresses,
    st.one_of(st.integers(0, 64), st.sampled_from([0xFFFF_FFFF, 16 * 4, 16 * 2000])),
    st.integers(0, 7),
    st.integers(0, SIZE + 2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptors, min_size=4, max_size=4),
    indirect_addr=st.sampled_from([INDIRECT, INDIRECT + 8, 2**64 - 64]),
    heads=st.lists(st.integers(0, SIZE + 2), min_size=0, max_size=SIZE + 4),
    features=st.sampled_from([VIRTIO_F_VERSION_1, ALL]),
)
def test_random_chains_never_escape(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    indirect_addr: int,
    heads: list[int],
    features: int,
) -> None:
    with GuestMemory.create(16 * MiB) as mem:
        dev = make(mem)
        try:
            drv = Driver(dev, mem, ring=TABLE, size=SIZE)
            drv.start(features)
            for i, (addr, length, flags, nxt) in enumerate(indirect):
                drv.put_desc(INDIRECT, i, addr, length, flags, nxt)
            for i, (addr, length, flags, nxt) in enumerate(table):
                if flags & VIRTQ_DESC_F_INDIRECT:
                    addr = indirect_addr
                drv.put_desc(drv.desc, i, addr, length, flags, nxt)
            mem.view(0x20000, 0x20000)[:] = os.urandom(0x20000)
            for h in heads[:SIZE]:
                drv.publish(h)
            if len(heads) > SIZE:  # an available index that jumps past the queue size
                struct.pack_into("<H", mem.view(drv.avail + 2, 2), 0, len(heads) + SIZE)
            before = bytes(mem.view(0, AREA))
            allowed = [(drv.used, 6 + 8 * SIZE)]
            for addr, length, flags, _ in table + indirect:
                if flags & VIRTQ_DESC_F_WRITE:
                    allowed.append((addr, length))
            dev.process(0)  # must not raise
            after = bytes(mem.view(0, AREA))
            changed = [
                i
                for block in range(0, AREA, 4096)
                if before[block : block + 4096] != after[block : block + 4096]
                for i in range(block, block + 4096)
                if before[i] != after[i]
            ]
            for i in changed:
                assert any(a <= i < a + n for a, n in allowed), f"wrote {i:#x}"
            used = drv.take_used()
            if not dev.broken:
                assert len(used) == min(len(heads), SIZE)
            else:
                assert dev.status & DEVICE_NEEDS_RESET and dev.interrupt_status & INT_CONFIG
            for head, _length in used:
                assert 0 <= head < SIZE
        finally:
            dev.close()


# --- state, drain and fds -----------------------------------------------------------------------


class DictSource:
    def __init__(self, parts: list[tuple[str, bytes]], component: str) -> None:
        self.data = {f"{component}/{name}" if name else component: data for name, data in parts}

    def get(self, name: str) -> bytes | None:
        return self.data.get(name)


def test_save_restore_continues_the_queue(mem: GuestMemory) -> None:
    dev = make(mem)
    drv = Driver(dev, mem)
    drv.start(ALL)
    for i in range(5):
        echo_chain(drv, bytes([65 + i]) * 3, DATA + 0x10 * i, DATA + 0x1000 + 0x10 * i)
    dev.process(0)
    assert len(drv.take_used()) == 5
    pending = [
        echo_chain(drv, b"after", DATA + 0x200 + 0x10 * i, DATA + 0x2000 + 0x10 * i)
        for i in range(3)
    ]
    saved = dev.save_parts()
    names = [n for n, _ in saved]
    assert names == ["", "queue/0"]
    dev.close()

    new = make(mem)
    try:
        new.load_parts(Parts(DictSource(saved, "device/virtio/0"), "device/virtio/0"))()
        assert new.status & (DRIVER_OK | FEATURES_OK) == DRIVER_OK | FEATURES_OK
        assert new.driver_features == ALL
        assert new.queues[0].next_avail == 5 and new.queues[0].active
        new.process(0)
        drv.dev = new
        assert [h for h, _ in drv.take_used()] == pending
        assert drv.used_idx() == 8
        assert drv.read(Reg.INTERRUPT_STATUS) == INT_VRING
    finally:
        new.close()


def test_restore_refuses_another_device_or_features(mem: GuestMemory) -> None:
    dev = make(mem)
    drv = Driver(dev, mem)
    drv.start(ALL)
    saved = dev.save_parts()
    dev.close()
    other = make(mem)
    try:
        other.backend.device_id = 43  # type: ignore[misc]
        with pytest.raises(VirtioStateError, match="virtio device 42"):
            other.load_parts(Parts(DictSource(saved, "d"), "d"))
        other.backend.device_id = 42  # type: ignore[misc]
        other.offered = VIRTIO_F_VERSION_1
        with pytest.raises(VirtioStateError, match="does not offer"):
            other.load_parts(Parts(DictSource(saved, "d"), "d"))
        with pytest.raises(VirtioStateError, match="missing keys"):
            other.load_parts(Parts(DictSource([("", b'{"version":1}')], "d"), "d"))
    finally:
        other.close()


def test_drain_stops_at_a_request_boundary_and_resume_goes_on(
    dev: VirtioMmioDevice, mem: GuestMemory
) -> None:
    drv = Driver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    dev.start()
    with pytest.raises(VirtioStateError, match="drain"):
        dev.save_parts()  # the I/O thread runs: the state could change under the save
    assert dev.drain(timeout=10)
    head = echo_chain(drv, b"held")
    drv.write(Reg.QUEUE_NOTIFY, 0)
    # The parked thread leaves the notification counted in its eventfd.
    assert select.select([dev.notify_fds[0]], [], [], 0)[0]
    assert drv.used_idx() == 0
    saved = dict(dev.save_parts())
    assert b'"next_avail":0' in saved["queue/0"]
    dev.resume()
    deadline = time.monotonic() + 10
    while drv.used_idx() != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert drv.take_used() == [(head, 4)]


def test_host_fds(dev: VirtioMmioDevice) -> None:
    fds = dev.host_fds()
    assert set(fds) == {"irq", "notify/0"}
    assert all(os.fstat(fd) for fd in fds.values())


def test_built_on_inherited_eventfds(mem: GuestMemory) -> None:
    irq = os.eventfd(0, os.EFD_NONBLOCK)
    notify = os.eventfd(0, os.EFD_NONBLOCK)
    dev = VirtioMmioDevice(Echo(), mem, BASE, 5, "inherited", irq_fd=irq, notify_fds=[notify])
    assert dev.host_fds() == {"irq": irq, "notify/0": notify}
    dev.close()
    with pytest.raises(OSError):
        os.fstat(irq)
    with pytest.raises(VirtioStateError, match="2 notify fds for 1 queues"):
        VirtioMmioDevice(Echo(), mem, BASE, 5, "x", notify_fds=[1, 2])


# --- malformed saved queues, and the interrupt across a hand-off ---------------------------------


def saved_with_queue(mem: GuestMemory, **queue: int) -> list[tuple[str, bytes]]:
    """A live device's saved state with queue 0's record changed."""
    dev = make(mem)
    drv = Driver(dev, mem)
    drv.start(ALL)
    parts = dict(dev.save_parts())
    dev.close()
    record = json.loads(parts["queue/0"]) | queue
    parts["queue/0"] = json.dumps(record).encode()
    return list(parts.items())


@pytest.mark.parametrize(
    ("queue", "message"),
    [({"size": 512}, "size"), ({"next_avail": 70000}, "next_avail"), ({"desc": -1}, "desc")],
)
def test_a_malformed_saved_queue_is_refused(
    mem: GuestMemory, queue: dict[str, int], message: str
) -> None:
    saved = saved_with_queue(mem, **queue)
    dev = make(mem)
    try:
        with pytest.raises(VirtioStateError, match=message):
            dev.load_parts(Parts(DictSource(saved, "d"), "d"))
    finally:
        dev.close()


@pytest.mark.parametrize(
    "queue",
    [{"size": 3}, {"desc": 8}, {"desc": 16 * MiB - 2048}, {"device": 16 * MiB}],
    ids=["size-not-power-of-2", "misaligned", "table-beyond-ram", "used-beyond-ram"],
)
def test_a_saved_queue_the_driver_set_up_wrongly_breaks_the_device(
    mem: GuestMemory, queue: dict[str, int]
) -> None:
    """A state that is well-formed but describes an unusable queue (as a guest could have
    set one up) imports, and the device is then broken as it would have been on the source:
    DEVICE_NEEDS_RESET and a configuration interrupt, nothing raised, no ring touched."""
    saved = saved_with_queue(mem, **queue)
    dev = make(mem)
    try:
        dev.load_parts(Parts(DictSource(saved, "d"), "d"))()
        assert dev.status & DEVICE_NEEDS_RESET and not dev.queues[0].active
        assert dev.interrupt_status & INT_CONFIG and irq_count(dev) == 1
        dev.process(0)  # nothing happens
    finally:
        dev.close()


def test_an_available_index_out_of_reach_after_restore_breaks_the_device(mem: GuestMemory) -> None:
    """The saved position is more than a queue's size behind the driver's available index
    (a state from another guest, or a driver gone wrong): the first look at the queue breaks
    the device instead of serving chains that are not there."""
    saved = saved_with_queue(mem, next_avail=1000)
    dev = make(mem)
    try:
        dev.load_parts(Parts(DictSource(saved, "d"), "d"))()
        dev.process(0)
        assert dev.status & DEVICE_NEEDS_RESET
    finally:
        dev.close()


def test_interrupt_detach_and_attach_are_idempotent(mem: GuestMemory) -> None:
    """Without a VM nothing is assigned; the flags follow attach/detach (the KVM side is
    covered by the hand-off tests on real VMs)."""
    dev = make(mem)
    try:
        dev.attach_interrupt()
        dev.detach_interrupt()
        assert not dev.interrupt_attached
    finally:
        dev.close()


def _watch_used_idx(fd: int, stop: Any, out: Any) -> None:
    """In another process: count the reads of the used ring's index that find 0."""
    view = mmap.mmap(fd, 16 * MiB)
    unpack = struct.Struct("<H").unpack_from
    zeros = reads = 0
    while not stop.is_set():
        for _ in range(1000):
            zeros += unpack(view, USED_AT + 2)[0] == 0
        reads += 1000
    out.put((zeros, reads))


USED_AT = 0x2000


def test_the_used_index_is_published_in_one_store(mem: GuestMemory) -> None:
    """A driver reads ``used.idx`` while the device publishes it, from another CPU: it must
    see the old value or the new one, never a mix. (``struct.pack_into`` zeroes its target
    before it packs: a guest polling the ring saw the index drop to 0 and took 65536 stale
    entries for completions.) Here another process polls the index while the device
    publishes indexes from 1 to 60000 over and over: it must never read 0."""
    q = SplitQueue(0)
    q.size, q.desc, q.driver, q.device = 256, 0, 0x1000, USED_AT
    q.activate(mem, event_idx=False, indirect=False)
    q.next_used = 0
    q.push_used([(0, 1)])  # the index is 1 before the watcher starts
    ctx = multiprocessing.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    watcher = ctx.Process(target=_watch_used_idx, args=(mem.fd, stop, out))
    watcher.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            q.next_used = 1
            for _ in range(5000):
                q.push_used([(0, 1)])
    finally:
        stop.set()
        zeros, reads = out.get(timeout=60)
        watcher.join(60)
    assert reads > 0
    assert zeros == 0, f"the used index read 0 in {zeros} of {reads} reads"
