"""Where virtio-mmio devices sit: fixed guest-physical windows and interrupt lines.

Device ``n`` (``--disk`` devices in command-line order, then network devices) has its
register window at ``VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE`` (in the 32-bit hole that
guest RAM leaves free, below the IOAPIC) and raises GSI ``VIRTIO_FIRST_GSI + n`` on the
IOAPIC, edge-triggered. The guest learns both from a ``virtio_mmio.device=4K@BASE:IRQ``
entry on its command line, the form Linux's virtio_mmio driver parses. This module imports
nothing, so the machine's configuration can describe the devices without loading them.
"""

from __future__ import annotations

VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000
#: The bytes of a window the device answers (the stride: what the command line announces).
VIRTIO_MMIO_WINDOW = 0x1000
VIRTIO_FIRST_GSI = 5
#: GSIs 5..20: the IOAPIC has 24 pins, the top ones kept free.
MAX_VIRTIO_DEVICES = 16
#: QueueNotify's offset in the register window.
QUEUE_NOTIFY_OFFSET = 0x50


def device_base(n: int) -> int:
    return VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE


def device_gsi(n: int) -> int:
    return VIRTIO_FIRST_GSI + n


def notify_address(base: int) -> int:
    return base + QUEUE_NOTIFY_OFFSET


def cmdline_entry(n: int) -> str:
    """The guest command-line entry announcing device ``n``."""
    return f"virtio_mmio.device={VIRTIO_MMIO_WINDOW // 1024}K@{device_base(n):#x}:{device_gsi(n)}"
