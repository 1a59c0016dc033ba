"""The virtio-mmio transport (virtio 1.x, section 4.2; register layout version 2).

One :class:`VirtioMmioDevice` is a register window in guest-physical memory
(``VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE``), an interrupt line (GSI ``VIRTIO_FIRST_GSI + n``,
edge-triggered, delivered through an irqfd), one eventfd per queue that KVM signals when the
guest writes the queue's index to QueueNotify (an ioeventfd: no exit to the VMM), an I/O
thread that serves those eventfds, and a *backend* (:class:`VirtioBackend`, e.g. the block
device) that handles one descriptor chain at a time.

Threads and locks. Register accesses come from vCPU threads; queue processing runs on the
device's I/O thread. ``_lock`` guards the registers and is held only briefly (InterruptStatus
and InterruptACK are on the interrupt path). ``_work`` is held while a batch of chains is
processed, and by the register writes that change what processing sees (Status, QueueReady):
so a reset or an activation waits for the batch in progress, and a batch never sees a queue
half set up. Lock order: ``_work`` before ``_lock``.

Feature negotiation. The device offers the backend's features plus VIRTIO_F_VERSION_1,
VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX. When the driver sets FEATURES_OK,
its features must be a subset of the offer and include VERSION_1 (this is a 1.x-only device);
otherwise FEATURES_OK is not kept, which the driver sees when it reads Status back.

Failure. A queue the driver set up wrongly, a malformed chain or request (see
:mod:`~intrahost.vmm.devices.virtio.queue`) marks the device DEVICE_NEEDS_RESET with one log
line and a configuration-change interrupt; it processes nothing until the driver resets it.
Nothing the guest writes makes the VMM raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol, runtime_checkable

from intrahost.kvm import KvmError, Vm
from intrahost.vmm.devices.virtio.iothread import IoThread
from intrahost.vmm.devices.virtio.layout import (
    VIRTIO_MMIO_WINDOW,
    notify_address,
)
from intrahost.vmm.devices.virtio.queue import (
    MAX_QUEUE_SIZE,
    Chain,
    GuestRam,
    QueueError,
    QueueState,
    SplitQueue,
    VirtioStateError,
)
from intrahost.vmm.persist import Apply, JsonRecord, Parts, bounded

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x48544E49  # "INTH"


class Reg(IntEnum):
    """Register offsets in the window (all 32-bit; the config space starts at CONFIG)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


# Device status bits.
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# Interrupt status bits.
INT_VRING = 1
INT_CONFIG = 2

# Transport feature bits.
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX

STATE_VERSION = 1
_U64 = 2**64 - 1
_U32 = 0xFFFF_FFFF


class VirtioBackend(Protocol):
    """A virtio device type behind the transport: the block device, later the network one."""

    #: The virtio device ID (2 = block, 1 = network).
    device_id: int
    #: Device-type feature bits offered (the transport adds its own).
    features: int
    #: How many virtqueues the device has.
    queue_count: int

    def config_space(self) -> bytes:
        """The device-specific configuration space, as the driver reads it."""
        ...

    def handle(self, queue: int, chain: Chain) -> int | None:
        """Serve one chain of queue ``queue``; returns the bytes written into its
        device-writable buffers, or None when the host has nothing for the chain yet (the
        network device's receive queue on an empty tap): the transport puts the chain back
        and ends the batch, and the backend runs the queue again when it has (see
        :class:`HostFed`). Raises QueueError for a malformed request."""
        ...

    def host_fds(self) -> dict[str, int]:
        """The host fds the backend holds, by name (for a hand-off)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HostFed(Protocol):
    """A backend fed from the host as well as by the guest (the network device: frames
    arrive on its tap). It is given the device's I/O thread and ``process(queue)`` when the
    device is built, to run a queue when its host side becomes ready."""

    def bind(self, io: IoThread, process: Callable[[int], None]) -> None: ...


@runtime_checkable
class BackendState(Protocol):
    """A backend with state of its own (the block device's counters), saved as the device
    component's ``backend`` part. A state without that part (from an older VMM) loads as the
    backend's initial state."""

    def save_state(self) -> bytes: ...

    def load_state(self, payload: bytes | None, where: str) -> Callable[[], None]:
        """Validate ``payload`` (None: absent); the returned callable applies it."""
        ...


@dataclass(frozen=True)
class VirtioMmioState(
    JsonRecord, label="virtio-mmio state", error=VirtioStateError, version=STATE_VERSION
):
    """The transport's registers. ``driver_features`` are the negotiated features once
    FEATURES_OK is in ``status``. The queues are saved as parts of their own."""

    device_id: int = bounded(_U32)
    status: int = bounded(0xFF)
    driver_features: int = bounded(_U64)
    device_features_sel: int = bounded(_U32)
    driver_features_sel: int = bounded(_U32)
    queue_sel: int = bounded(_U32)
    interrupt_status: int = bounded(INT_VRING | INT_CONFIG)
    config_generation: int = bounded(_U32)


class VirtioMmioDevice:
    """A virtio device on the MMIO bus (see the module docstring)."""

    def __init__(
        self,
        backend: VirtioBackend,
        memory: GuestRam,
        base: int,
        gsi: int,
        name: str,
        irq_fd: int | None = None,
        notify_fds: list[int] | None = None,
    ) -> None:
        """``irq_fd`` and ``notify_fds``: eventfds inherited from another VMM (owned from now
        on); by default new ones are made."""
        self.backend = backend
        self.memory = memory
        self.base = base
        self.gsi = gsi
        self.name = name
        self.length = VIRTIO_MMIO_WINDOW
        n = backend.queue_count
        if notify_fds is not None and len(notify_fds) != n:
            raise VirtioStateError(f"{name}: {len(notify_fds)} notify fds for {n} queues")
        self.irq_fd = irq_fd if irq_fd is not None else _eventfd()
        self.notify_fds = notify_fds if notify_fds is not None else [_eventfd() for _ in range(n)]
        self.queues = [SplitQueue(i) for i in range(n)]
        self.offered = backend.features | TRANSPORT_FEATURES
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.interrupts = 0
        self._config = backend.config_space()
        self._lock = threading.Lock()
        self._work = threading.Lock()
        self._warned: set[str] = set()
        self._vm: Vm | None = None
        #: Whether this device's irqfd is assigned on ``_vm`` (see attach_interrupt).
        self._irq_attached = False
        self.io = IoThread(name)
        for i, fd in enumerate(self.notify_fds):
            self.io.watch(fd, _bind(self._on_notify, i))
        if isinstance(backend, HostFed):
            backend.bind(self.io, self.process)

    # --- KVM wiring ------------------------------------------------------------------------------

    def attach(self, vm: Vm, interrupt: bool = True) -> None:
        """Route this device's queue notifications (ioeventfds, 4-byte writes to QueueNotify
        matched on the queue index) and, with ``interrupt``, its interrupt (irqfd) through
        ``vm``'s kernel side.

        A hand-off's destination attaches without the interrupt: the same eventfds may carry
        ioeventfds on two VMs at once (so it registers them before the pause, while the source
        still runs the guest), but an eventfd can back only one irqfd on the whole host. Its
        irqfd is assigned with :meth:`attach_interrupt` once the source let go of it and the
        interrupt controllers are restored (an irqfd assigned before KVM_SET_IRQCHIP and
        KVM_SET_LAPIC would have the interrupt it injects overwritten by the restore)."""
        for i, fd in enumerate(self.notify_fds):
            vm.ioeventfd(fd, notify_address(self.base), 4, datamatch=i)
        self._vm = vm
        if interrupt:
            self.attach_interrupt()

    def attach_interrupt(self) -> None:
        """Assign the irqfd on the attached VM (nothing if it is assigned already). A write
        made to the eventfd while no irqfd was assigned is injected now."""
        if self._vm is None or self._irq_attached:
            return
        self._vm.irqfd(self.irq_fd, self.gsi)
        self._irq_attached = True

    def detach_interrupt(self) -> None:
        """Deassign the irqfd (0.02-0.03 ms): a hand-off's source does this in the pause, so
        that the destination can assign it. An interrupt signalled before is in the
        interrupt controllers' state by then (the deassign waits for pending injections);
        one signalled after stays counted in the eventfd for the next irqfd."""
        vm = self._vm
        if vm is None or not self._irq_attached:
            return
        self._irq_attached = False
        if not vm.closed:
            vm.irqfd(self.irq_fd, self.gsi, deassign=True)

    @property
    def interrupt_attached(self) -> bool:
        return self._irq_attached

    def detach(self, notifications: bool = True) -> None:
        """Undo :meth:`attach` (the eventfds stay open, e.g. to be handed to another VMM).
        ``notifications=False`` leaves the ioeventfds registered: deassigning one costs 7-8 ms
        (the kernel waits for a grace period), while closing the VM drops them at once."""
        self.detach_interrupt()
        vm, self._vm = self._vm, None
        if vm is None or vm.closed or not notifications:
            return
        for i, fd in enumerate(self.notify_fds):
            vm.ioeventfd(fd, notify_address(self.base), 4, datamatch=i, deassign=True)

    def host_fds(self) -> dict[str, int]:
        """Every host fd the device holds, by name: the backend's (``image``), ``irq`` and
        ``notify/N``. A hand-off passes these and rebuilds the device on them."""
        fds = dict(self.backend.host_fds())
        fds["irq"] = self.irq_fd
        for i, fd in enumerate(self.notify_fds):
            fds[f"notify/{i}"] = fd
        return fds

    # --- running -------------------------------------------------------------------------------

    def start(self) -> None:
        self.io.start()

    def drain(self, timeout: float = 5.0) -> bool:
        """Stop processing at a request boundary: the request in progress completes (and is
        published in the used ring), no new one starts. True once the I/O thread is parked."""
        return self.io.drain(timeout)

    def resume(self) -> None:
        """Undo :meth:`drain`, and look at every queue once: chains left in the ring by the
        drain, or whose notification the drain left pending, are served."""
        self.io.resume()
        self.io.call(self.process_all)

    def close(self, vm_closing: bool = False) -> None:
        """Stop the I/O thread, detach from the VM and close every fd. ``vm_closing``: the
        VM is closed right after (it drops the ioeventfds itself, see :meth:`detach`)."""
        try:
            self.detach(notifications=not vm_closing)
        except KvmError as e:  # a VM that is already dead (an SEV VM whose context moved)
            log.debug("%s: detaching from the VM: %s", self.name, e)
        self.io.close()
        with self._work:
            for q in self.queues:
                q.deactivate()
        for fd in (self.irq_fd, *self.notify_fds):
            if fd >= 0:
                os.close(fd)
        self.irq_fd = -1
        self.notify_fds = [-1] * len(self.notify_fds)
        self.backend.close()

    # --- registers (vCPU threads) ---------------------------------------------------------------

    def mmio_read(self, address: int, size: int) -> int:
        off = address - self.base
        if off >= Reg.CONFIG:
            at = off - Reg.CONFIG
            return int.from_bytes(self._config[at : at + size].ljust(size, b"\0"), "little")
        if size != 4 or off % 4:
            self._warn("access", f"{size}-byte read at register {off:#x} (registers are 32-bit)")
            return 0
        with self._lock:
            return self._read_register(off)

    def _read_register(self, off: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        match off:
            case Reg.MAGIC_VALUE:
                return MAGIC
            case Reg.VERSION:
                return VERSION
            case Reg.DEVICE_ID:
                return self.backend.device_id
            case Reg.VENDOR_ID:
                return VENDOR_ID
            case Reg.DEVICE_FEATURES:
                sel = self.device_features_sel
                return (self.offered >> (32 * sel)) & _U32 if sel < 2 else 0
            case Reg.QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0
            case Reg.QUEUE_READY:
                return int(q is not None and q.ready)
            case Reg.INTERRUPT_STATUS:
                return self.interrupt_status
            case Reg.STATUS:
                return self.status
            case Reg.SHM_LEN_LOW | Reg.SHM_LEN_HIGH:
                return _U32  # no shared memory regions: length ~0
            case Reg.CONFIG_GENERATION:
                return self.config_generation
        return 0

    def mmio_write(self, address: int, size: int, value: int) -> None:
        off = address - self.base
        if off >= Reg.CONFIG:
            self._warn("config", "configuration space writes are ignored (nothing writable)")
            return
        if size != 4 or off % 4:
            self._warn("access", f"{size}-byte write at register {off:#x} (registers are 32-bit)")
            return
        if off == Reg.QUEUE_NOTIFY:
            # Served here only when the write did not match an ioeventfd (no VM attached).
            if value < len(self.notify_fds):
                os.eventfd_write(self.notify_fds[value], 1)
            return
        if off in (Reg.STATUS, Reg.QUEUE_READY):
            with self._work, self._lock:
                if off == Reg.STATUS:
                    self._write_status(value)
                else:
                    self._write_queue_ready(value)
            return
        with self._lock:
            self._write_register(off, value)

    def _write_register(self, off: int, value: int) -> None:
        if off == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif off == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif off == Reg.DRIVER_FEATURES:
            sel = self.driver_features_sel
            if self.status & FEATURES_OK or sel > 1:
                self._warn("features", "driver features written after FEATURES_OK: ignored")
                return
            mask = _U32 << (32 * sel)
            self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif off == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif off == Reg.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif off in _QUEUE_REGISTERS:
            q = self._selected_queue()
            if q is None:
                return
            if q.ready or self.status & DRIVER_OK:
                self._warn("queue", f"queue {q.index} register {off:#x} written while live")
                return
            match off:
                case Reg.QUEUE_NUM:
                    q.size = value
                case Reg.QUEUE_DESC_LOW:
                    q.desc = (q.desc & ~_U32) | value
                case Reg.QUEUE_DESC_HIGH:
                    q.desc = (q.desc & _U32) | (value << 32)
                case Reg.QUEUE_DRIVER_LOW:
                    q.driver = (q.driver & ~_U32) | value
                case Reg.QUEUE_DRIVER_HIGH:
                    q.driver = (q.driver & _U32) | (value << 32)
                case Reg.QUEUE_DEVICE_LOW:
                    q.device = (q.device & ~_U32) | value
                case Reg.QUEUE_DEVICE_HIGH:
                    q.device = (q.device & _U32) | (value << 32)
        elif off != Reg.SHM_SEL:
            self._warn(f"reg{off:#x}", f"write to read-only or unknown register {off:#x}")

    def _selected_queue(self) -> SplitQueue | None:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        self._warn("queue_sel", f"queue {self.queue_sel} selected; the device has no such queue")
        return None

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            return
        if not value & 1:
            q.ready = False
            q.deactivate()
            return
        if q.ready:
            return
        q.ready = True
        if self.status & DRIVER_OK and not self.status & DEVICE_NEEDS_RESET:
            self._activate(q)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self.status
        new = (value & 0xFF) | (old & DEVICE_NEEDS_RESET)
        if new & FEATURES_OK and not old & FEATURES_OK:
            extra = self.driver_features & ~self.offered
            if extra or not self.driver_features & VIRTIO_F_VERSION_1:
                log.warning(
                    "%s: features %#x refused (%s); FEATURES_OK not set",
                    self.name,
                    self.driver_features,
                    f"not offered: {extra:#x}" if extra else "VIRTIO_F_VERSION_1 is required",
                )
                new &= ~FEATURES_OK
        self.status = new
        if new & DRIVER_OK and not old & DRIVER_OK and not new & DEVICE_NEEDS_RESET:
            if not new & FEATURES_OK:
                self._break_locked("DRIVER_OK without accepted features (FEATURES_OK)")
                return
            for q in self.queues:
                if q.ready and not self._activate(q):
                    return
            self.io.call(self.process_all)

    def _activate(self, q: SplitQueue) -> bool:
        try:
            q.activate(
                self.memory,
                event_idx=bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX),
                indirect=bool(self.driver_features & VIRTIO_RING_F_INDIRECT_DESC),
            )
        except QueueError as e:
            self._break_locked(str(e))
            return False
        return True

    def _reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned and len(self._warned) < 32:
            self._warned.add(key)
            log.warning("%s: %s (logged once)", self.name, text)

    # --- processing (the I/O thread) -------------------------------------------------------------

    def _on_notify(self, index: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.notify_fds[index])
        self.process(index)

    def process_all(self) -> None:
        for i in range(len(self.queues)):
            self.process(i)

    @property
    def live(self) -> bool:
        """Processing: DRIVER_OK and not broken."""
        return self.status & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK

    def process(self, index: int) -> None:
        """Serve every chain available on queue ``index``, a batch at a time: notifications
        off, chains handled, the used ring published once, notifications back on and the
        ring looked at again; one interrupt at the end if the driver wants one. A chain the
        backend has nothing for yet (``handle`` answers None) goes back to the ring and ends
        the batch with notifications left off: the backend runs the queue again when its
        host side is ready."""
        with self._work:
            q = self.queues[index]
            if not self.live or not q.active:
                return
            try:
                notify = self._process(q)
            except QueueError as e:
                self.break_device(str(e))
                return
            except Exception as e:
                log.exception("%s: queue %d processing failed", self.name, index)
                self.break_device(f"internal error: {e}")
                return
        if notify:
            self.signal(INT_VRING)

    def _process(self, q: SplitQueue) -> bool:
        handle = self.backend.handle
        index = q.index
        io = self.io
        notify = False
        while True:
            q.disable_notifications()
            done: list[tuple[int, int]] = []
            waiting = False
            try:
                while not io.draining:
                    chain = q.pop()
                    if chain is None:
                        break
                    written = handle(index, chain)
                    if written is None:
                        q.put_back()
                        waiting = True
                        break
                    done.append((chain.head, written))
            finally:
                if done:
                    notify |= q.push_used(done)
            if waiting or io.draining or not q.enable_notifications():
                return notify

    def signal(self, bits: int) -> None:
        """Set interrupt status ``bits`` and raise the interrupt (an edge through the irqfd)."""
        with self._lock:
            self.interrupt_status |= bits
            self.interrupts += 1
        os.eventfd_write(self.irq_fd, 1)

    def break_device(self, reason: str) -> None:
        """Mark the device DEVICE_NEEDS_RESET (a guest error), tell the driver."""
        with self._lock:
            self._break_locked(reason, signal=False)
        self.signal(INT_CONFIG)

    def _break_locked(self, reason: str, signal: bool = True) -> None:
        if not self.status & DEVICE_NEEDS_RESET:
            log.error("%s: DEVICE_NEEDS_RESET: %s", self.name, reason)
        self.status |= DEVICE_NEEDS_RESET
        if signal:
            self.interrupt_status |= INT_CONFIG
            self.interrupts += 1
            os.eventfd_write(self.irq_fd, 1)

    @property
    def broken(self) -> bool:
        return bool(self.status & DEVICE_NEEDS_RESET)

    # --- state -----------------------------------------------------------------------------------

    def save_parts(self) -> list[tuple[str, bytes]]:
        """The transport's registers and each queue, with the I/O thread drained."""
        if self.io.running and not self.io.draining:
            raise VirtioStateError(
                f"{self.name}: state saved while its I/O thread runs; drain() it first"
            )
        with self._work, self._lock:
            state = VirtioMmioState(
                device_id=self.backend.device_id,
                status=self.status,
                driver_features=self.driver_features,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                queue_sel=self.queue_sel,
                interrupt_status=self.interrupt_status,
                config_generation=self.config_generation,
            )
            parts = [("", state.to_json())]
            parts += [(f"queue/{q.index}", q.save().to_json()) for q in self.queues]
            if isinstance(self.backend, BackendState):
                parts.append(("backend", self.backend.save_state()))
        return parts

    def load_parts(self, parts: Parts) -> Apply:
        state = parts.record(VirtioMmioState)
        if state.device_id != self.backend.device_id:
            raise VirtioStateError(
                f"component {parts.name()!r} is virtio device {state.device_id}; this one is "
                f"{self.backend.device_id}"
            )
        if state.driver_features & ~self.offered:
            raise VirtioStateError(
                f"component {parts.name()!r} negotiated features {state.driver_features:#x} "
                f"this device does not offer ({self.offered:#x})"
            )
        queues = [parts.record(QueueState, f"queue/{q.index}") for q in self.queues]
        backend: Callable[[], None] | None = None
        if isinstance(self.backend, BackendState):
            backend = self.backend.load_state(parts.get("backend"), parts.name("backend"))

        def apply() -> None:
            if backend is not None:
                backend()
            self.restore(state, queues)

        return apply

    def restore(self, state: VirtioMmioState, queues: list[QueueState]) -> None:
        """Continue from a saved state: registers, queues (re-activated on this device's
        memory when the driver had set DRIVER_OK), then one look at every queue."""
        with self._work, self._lock:
            self.status = state.status
            self.driver_features = state.driver_features
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.queue_sel = state.queue_sel
            self.interrupt_status = state.interrupt_status
            self.config_generation = state.config_generation
            for q, qs in zip(self.queues, queues, strict=True):
                q.restore(qs)
                if self.live and q.ready:
                    self._activate(q)
        self.io.call(self.process_all)

    # --- queries ---------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        with self._lock:
            return {
                "mmio-base": self.base,
                "irq": self.gsi,
                "status": self.status,
                "features": self.driver_features,
                "broken": self.broken,
                "interrupts": self.interrupts,
            }


_QUEUE_REGISTERS = frozenset(
    (
        Reg.QUEUE_NUM,
        Reg.QUEUE_DESC_LOW,
        Reg.QUEUE_DESC_HIGH,
        Reg.QUEUE_DRIVER_LOW,
        Reg.QUEUE_DRIVER_HIGH,
        Reg.QUEUE_DEVICE_LOW,
        Reg.QUEUE_DEVICE_HIGH,
    )
)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _bind(fn: Callable[[int], None], i: int) -> Callable[[], None]:
    return lambda: fn(i)


__all__ = ["MAX_QUEUE_SIZE", "HostFed", "VirtioBackend", "VirtioMmioDevice", "VirtioMmioState"]
