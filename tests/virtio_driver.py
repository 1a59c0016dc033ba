"""A small virtio-mmio driver for tests: it lays out one split queue in guest memory and
talks to a device through the device's MMIO handlers (as a vCPU's accesses would arrive)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from intrahost.vmm.devices.virtio.mmio import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    Reg,
    VirtioMmioDevice,
)
from intrahost.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from intrahost.vmm.memory import GuestMemory

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain: ``write`` means device-writable."""

    addr: int
    length: int
    write: bool = False


class Driver:
    """Queue ``queue`` (default 0) of ``dev``: descriptor table at ``ring``, then the
    available ring, then the used ring (4-aligned). Descriptors are handed out round-robin.
    For a device with several queues, one Driver per queue: :func:`start_queues`."""

    def __init__(
        self,
        dev: VirtioMmioDevice,
        mem: GuestMemory,
        ring: int = 0x10000,
        size: int = 256,
        queue: int = 0,
    ) -> None:
        self.dev = dev
        self.queue = queue
        self.mem = mem
        self.size = size
        self.desc = ring
        self.avail = ring + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    # --- registers -----------------------------------------------------------------------------

    def read(self, reg: int) -> int:
        return self.dev.mmio_read(self.dev.base + reg, 4)

    def write(self, reg: int, value: int) -> None:
        self.dev.mmio_write(self.dev.base + reg, 4, value)

    def device_features(self) -> int:
        self.write(Reg.DEVICE_FEATURES_SEL, 0)
        low = self.read(Reg.DEVICE_FEATURES)
        self.write(Reg.DEVICE_FEATURES_SEL, 1)
        return low | self.read(Reg.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, acknowledge, write ``features`` (default: all offered); True if the device
        kept FEATURES_OK."""
        self.write(Reg.STATUS, 0)
        self.write(Reg.STATUS, ACKNOWLEDGE)
        self.write(Reg.STATUS, ACKNOWLEDGE | DRIVER)
        offered = self.device_features()
        chosen = offered if features is None else features
        for sel in (0, 1):
            self.write(Reg.DRIVER_FEATURES_SEL, sel)
            self.write(Reg.DRIVER_FEATURES, (chosen >> (32 * sel)) & 0xFFFF_FFFF)
        self.write(Reg.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return bool(self.read(Reg.STATUS) & FEATURES_OK)

    def setup_queue(self) -> None:
        self.write(Reg.QUEUE_SEL, self.queue)
        self.write(Reg.QUEUE_NUM, self.size)
        for reg, addr in (
            (Reg.QUEUE_DESC_LOW, self.desc),
            (Reg.QUEUE_DRIVER_LOW, self.avail),
            (Reg.QUEUE_DEVICE_LOW, self.used),
        ):
            self.write(reg, addr & 0xFFFF_FFFF)
            self.write(reg + 4, addr >> 32)
        self.write(Reg.QUEUE_READY, 1)

    def start(self, features: int | None = None) -> None:
        assert self.negotiate(features)
        self.setup_queue()
        self.write(Reg.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def kick(self) -> None:
        """Notify the device of this queue (QueueNotify)."""
        self.write(Reg.QUEUE_NOTIFY, self.queue)

    # --- rings ----------------------------------------------------------------------------------

    def put_desc(
        self, table: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        DESC.pack_into(self.mem.view(table + 16 * index, 16), 0, addr, length, flags, nxt)

    def add(self, bufs: list[Buf], indirect_at: int | None = None) -> int:
        """Make a chain of ``bufs`` available (through an indirect table at ``indirect_at``
        if given); returns its head."""
        if indirect_at is not None:
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                )
                self.put_desc(indirect_at, i, b.addr, b.length, flags, i + 1)
            head = self._take()
            self.put_desc(self.desc, head, indirect_at, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            indexes = [self._take() for _ in bufs]
            for i, b in enumerate(bufs):
                last = i + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                nxt = 0 if last else indexes[i + 1]
                self.put_desc(self.desc, indexes[i], b.addr, b.length, flags, nxt)
            head = indexes[0]
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        U16.pack_into(self.mem.view(self.avail + 4 + 2 * (self.avail_idx % self.size), 2), 0, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self.mem.view(self.avail + 2, 2), 0, self.avail_idx)

    def _take(self) -> int:
        i = self.next_desc
        self.next_desc = (i + 1) % self.size
        return i

    def used_idx(self) -> int:
        return int(U16.unpack_from(self.mem.view(self.used + 2, 2))[0])

    def used_flags(self) -> int:
        return int(U16.unpack_from(self.mem.view(self.used, 2))[0])

    def avail_event(self) -> int:
        return int(U16.unpack_from(self.mem.view(self.used + 4 + 8 * self.size, 2))[0])

    def set_used_event(self, value: int) -> None:
        U16.pack_into(self.mem.view(self.avail + 4 + 2 * self.size, 2), 0, value)

    def set_avail_flags(self, value: int) -> None:
        U16.pack_into(self.mem.view(self.avail, 2), 0, value)

    def take_used(self) -> list[tuple[int, int]]:
        """The used elements published since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            at = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(USED.unpack_from(self.mem.view(at, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


def start_queues(drivers: list[Driver], features: int | None = None) -> None:
    """Negotiate once, set up every driver's queue, then DRIVER_OK."""
    first = drivers[0]
    assert first.negotiate(features)
    for d in drivers:
        d.setup_queue()
    first.write(Reg.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
