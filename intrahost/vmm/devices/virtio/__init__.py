"""virtio devices over the MMIO transport: split virtqueues, the transport, an I/O thread
per device, and the block device. See docs/devices.md."""

from intrahost.vmm.devices.virtio.block import (
    DiskImage,
    DiskImageError,
    DiskLockedError,
    VirtioBlock,
)
from intrahost.vmm.devices.virtio.iothread import IoThread
from intrahost.vmm.devices.virtio.layout import (
    MAX_VIRTIO_DEVICES,
    VIRTIO_FIRST_GSI,
    VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_STRIDE,
    cmdline_entry,
    device_base,
    device_gsi,
)
from intrahost.vmm.devices.virtio.mmio import VirtioBackend, VirtioMmioDevice, VirtioMmioState
from intrahost.vmm.devices.virtio.queue import (
    Chain,
    QueueError,
    QueueState,
    SplitQueue,
    VirtioStateError,
)

__all__ = [
    "MAX_VIRTIO_DEVICES",
    "VIRTIO_FIRST_GSI",
    "VIRTIO_MMIO_BASE",
    "VIRTIO_MMIO_STRIDE",
    "Chain",
    "DiskImage",
    "DiskImageError",
    "DiskLockedError",
    "IoThread",
    "QueueError",
    "QueueState",
    "SplitQueue",
    "VirtioBackend",
    "VirtioBlock",
    "VirtioMmioDevice",
    "VirtioMmioState",
    "VirtioStateError",
    "cmdline_entry",
    "device_base",
    "device_gsi",
]
