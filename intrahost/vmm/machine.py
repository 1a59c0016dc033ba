"""A VM assembled from the pieces: KVM objects, guest memory, vCPU threads and devices.

Build order (also the destination's order during a hand-off, all of it before the pause):

1. KVM_CREATE_VM, the TSS and identity-map pages (placed in the hole below 4 GiB);
2. the in-kernel irqchip (PIC, IOAPIC, per-vCPU LAPIC) and PIT;
3. the memory slots — after the irqchip, because the first slot registered after
   KVM_CREATE_IRQCHIP waits for an RCU grace period (5-8 ms on these hosts);
4. the vCPUs, each with the host's supported CPUID;
5. the devices on the I/O bus: COM1 (IRQ 4) and the debug port;
6. the virtio-mmio devices, in device order (``--disk`` devices in command-line order, then
   ``--net`` devices in command-line order): each on the MMIO bus at its fixed window, its
   interrupt routed through an irqfd and its queue notifications through ioeventfds
   (docs/devices.md). A booted machine's disk images are opened and locked, and its taps
   opened, by :meth:`Machine.create` before anything else, so a locked image or a busy tap
   fails the start at once. A machine built for an incoming hand-off builds its devices on
   the image, tap and eventfd fds the source VMM passed (it never opens an image or a tap by
   name), and
   registers only their ioeventfds: the irqfds are the source's until it lets go of them in
   the pause, and are assigned by :meth:`Machine.attach_interrupts` after the state import.

A booted machine then loads its guest into memory and sets the boot vCPU's registers; a
machine built for an incoming hand-off instead imports the saved state.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.kvm import (
    FailEntry,
    Halt,
    InternalErrorExit,
    Kvm,
    MmioRead,
    MmioWrite,
    PortIn,
    PortOut,
    Shutdown,
    SystemEvent,
    Vcpu,
    VcpuExit,
    Vm,
)
from intrahost.kvm.features import VcpuFeatures, probe_features
from intrahost.vmm.confidential import ConfidentialGuest
from intrahost.vmm.config import DiskConfig
from intrahost.vmm.config import MachineConfig as MachineConfig
from intrahost.vmm.config import MachineConfigError as MachineConfigError
from intrahost.vmm.devices.bus import IoBus, MmioBus
from intrahost.vmm.devices.console import Console, open_console
from intrahost.vmm.devices.debugport import DebugPort
from intrahost.vmm.devices.uart import COM1_BASE, Uart16550
from intrahost.vmm.devices.virtio.block import DiskImage, VirtioBlock
from intrahost.vmm.devices.virtio.layout import device_base, device_gsi
from intrahost.vmm.devices.virtio.mmio import VirtioBackend, VirtioMmioDevice
from intrahost.vmm.devices.virtio.net import VirtioNet
from intrahost.vmm.devices.virtio.tap import Tap, TapError
from intrahost.vmm.kvm_state import VcpuComponent, VmComponent
from intrahost.vmm.memory import GuestMemory
from intrahost.vmm.persist import Persist
from intrahost.vmm.vcpu import PauseTimeout, VcpuGroup

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
COM1_IRQ = 4


class MachineError(IntrahostError):
    """The machine cannot do what was asked in its current state."""


class DeviceDrainTimeout(PauseTimeout):
    """A device did not stop its I/O in time; the pause was undone (the guest runs as
    before)."""


class Machine:
    """A VM with its memory, vCPU threads and devices."""

    def __init__(
        self,
        config: MachineConfig,
        memory: GuestMemory,
        kvm: Kvm | None = None,
        incoming: bool = False,
        disk_images: Sequence[DiskImage] = (),
        taps: Sequence[Tap] = (),
        inherited_fds: Sequence[Mapping[str, int]] = (),
        console: Console | None = None,
    ) -> None:
        """Build the machine on ``memory``. ``incoming``: for a hand-off's destination (an
        SEV context will be moved in, so the SEV VM is not initialised here).
        ``disk_images``: the open images of ``config.disks``, in order (owned from now on),
        opened by :meth:`create`; ``taps`` likewise the open taps of ``config.nets``.
        ``inherited_fds``: for an incoming machine instead, each
        virtio device's host fds as the source's device listed them
        (:meth:`VirtioMmioDevice.host_fds`: ``image`` or ``tap``, ``irq``, ``notify/N``), in device
        order; owned from now on (closed if the build fails). ``console``: the UART's console
        (the machine owns it), instead of opening ``config.serial``."""
        #: Images not yet adopted by a device (closed by close() if the build fails).
        self._pending_images = list(disk_images)
        #: Taps not yet adopted by a device (closed by close() likewise).
        self._pending_taps = list(taps)
        #: Inherited fds not yet adopted by a device (closed by close() likewise).
        self._pending_fds = [dict(fds) for fds in inherited_fds]
        #: How long the last pause took to drain the devices and release their irqfds (µs).
        self.drain_us = 0
        self.config = config
        self.incoming = incoming
        self._console = console
        self.confidential: ConfidentialGuest | None = None
        self.memory = memory
        self.kvm = kvm or Kvm()
        self._owns_kvm = kvm is None
        self.vm: Vm = self.kvm.create_vm()
        self.vcpus: list[Vcpu] = []
        self.features: VcpuFeatures
        self.cpuid = b""
        self.bus = IoBus()
        self.uart: Uart16550
        self.debug = DebugPort(current_vcpu=_current_vcpu)
        self.group: VcpuGroup
        self.started_at = 0.0
        #: When the guest first started, on the host's CLOCK_BOOTTIME (seconds): kept across
        #: hand-offs (the destination takes the source's), so the guest's uptime survives
        #: upgrades. None until the guest starts.
        self.booted_at: float | None = None
        self.exit_code: int | None = None
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        #: Called (on a vCPU thread) when the guest stops by itself: exit port, shutdown,
        #: an internal error. The control API uses it to emit SHUTDOWN.
        self.on_guest_stop: Callable[[], None] | None = None
        #: Guest-physical MMIO: devices register here; unclaimed addresses read all ones.
        self.mmio = MmioBus()
        #: The virtio-mmio devices, in device order.
        self.virtio: list[VirtioMmioDevice] = []
        #: State components (see components()): the kernel's, rebuilt with the VM; the
        #: devices', registered as each device is added.
        self._kernel_state: dict[str, Persist] = {}
        self._device_state: dict[str, Persist] = {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def create(cls, config: MachineConfig, kvm: Kvm | None = None) -> Machine:
        """New guest memory and a fresh VM, with the guest loaded and ready to start."""
        from intrahost.vmm.boot import boot_guest

        images = open_disks(config)
        try:
            taps = open_taps(config)
        except BaseException:
            for image in images:
                image.close()
            raise
        config = dataclasses.replace(
            config,
            disks=tuple(
                dataclasses.replace(d, size=image.size)
                for d, image in zip(config.disks, images, strict=True)
            ),
            nets=tuple(n.with_mac() for n in config.nets),
        )
        try:
            memory = GuestMemory.create(config.memory, config.memory_path)
        except BaseException:
            for image in images:
                image.close()
            for tap in taps:
                tap.close()
            raise
        try:
            machine = cls(config, memory, kvm, disk_images=images, taps=taps)
        except BaseException:
            memory.close()
            for image in images:  # idempotent: those a device adopted are closed already
                image.close()
            for tap in taps:
                tap.close()
            raise
        try:
            image_size = boot_guest(machine)
            if machine.confidential is not None:
                machine.confidential.launch(machine, image_size, config.sev_policy)
        except BaseException:
            machine.close()
            raise
        return machine

    def _build(self) -> None:
        self._build_vm()
        console, self._console = self._console, None
        self.uart = Uart16550(
            console if console is not None else open_console(self.config.serial),
            irq=self._uart_irq,
        )
        self.bus.register(COM1_BASE, self.uart.length, self.uart, "COM1")
        self.add_state("device/uart", self.uart.persist())
        self.bus.register(self.debug.base, self.debug.length, self.debug, "debug port")
        self.add_state("device/debug", self.debug.persist())
        self.debug.on_exit = self._guest_exit
        self._build_virtio()
        self._build_group()

    def _build_virtio(self) -> None:
        """Step 6 of the build order: one virtio-blk device per disk, then one virtio-net
        device per net."""
        disks = self.config.disks
        count = self.config.virtio_count
        if not count:
            return
        if self.incoming:
            if len(self._pending_fds) != count:
                nets = f" and {len(self.config.nets)} net(s)" if self.config.nets else ""
                raise MachineError(
                    f"the guest has {len(disks)} disk(s){nets} but the source VMM passed the "
                    f"open images, taps and eventfds of {len(self._pending_fds)} device(s): a "
                    "VMM taking over a guest never opens its images or taps by name"
                )
        elif len(self._pending_images) != len(disks):
            raise MachineError(f"{len(disks)} disk(s) configured, {len(self._pending_images)} open")
        elif len(self._pending_taps) != len(self.config.nets):
            raise MachineError(
                f"{len(self.config.nets)} net(s) configured, {len(self._pending_taps)} open"
            )
        for n, disk in enumerate(disks):
            irq_fd: int | None = None
            notify_fds: list[int] | None = None
            if self.incoming:
                fds = self._pending_fds[0]
                names = disk_fd_names()
                if sorted(fds) != sorted(names):
                    raise MachineError(
                        f"disk {disk.id}: the source passed fds {sorted(fds)}, not {list(names)}"
                    )
                image = inherited_image(fds["image"], disk)
                del fds["image"]
                if disk.size is not None and image.size != disk.size:
                    self._pending_images.append(image)
                    raise MachineError(
                        f"disk {disk.id}: the inherited image holds {image.size} bytes, the "
                        f"guest's disk {disk.size}"
                    )
                irq_fd, notify_fds = fds.pop("irq"), [fds.pop("notify/0")]
                self._pending_fds.pop(0)
            else:
                image = self._pending_images.pop(0)
            self._add_virtio(
                n, VirtioBlock(image, disk.id), f"virtio-blk{n} ({disk.id})", irq_fd, notify_fds
            )
        for n, net in enumerate(self.config.nets, start=len(disks)):
            irq_fd = notify_fds = None
            if self.incoming:
                fds = self._pending_fds[0]
                if sorted(fds) != sorted(net_fd_names()):
                    raise MachineError(
                        f"net {net.id}: the source passed fds {sorted(fds)}, not "
                        f"{list(net_fd_names())}"
                    )
                try:
                    tap = Tap.from_fd(fds["tap"], f"net {net.id}'s inherited tap fd")
                except TapError as e:
                    raise MachineError(str(e)) from None
                del fds["tap"]
                irq_fd = fds.pop("irq")
                notify_fds = [fds.pop("notify/0"), fds.pop("notify/1")]
                self._pending_fds.pop(0)
            else:
                tap = self._pending_taps.pop(0)
            self._add_virtio(
                n, VirtioNet(tap, net.id, net.mac), f"virtio-net{n} ({net.id})", irq_fd, notify_fds
            )

    def _add_virtio(
        self,
        n: int,
        backend: VirtioBackend,
        name: str,
        irq_fd: int | None,
        notify_fds: list[int] | None,
    ) -> None:
        """Virtio device ``n`` (its MMIO base and GSI follow from ``n``) on ``backend``;
        ``irq_fd`` and ``notify_fds``: the source VMM's eventfds, on a hand-off."""
        device = VirtioMmioDevice(
            backend,
            self.memory,
            device_base(n),
            device_gsi(n),
            name,
            irq_fd=irq_fd,
            notify_fds=notify_fds,
        )
        self.virtio.append(device)
        device.attach(self.vm, interrupt=not self.incoming)
        self.mmio.register(device.base, device.length, device, device.name)
        self.add_state(f"device/virtio/{n}", device)

    def _build_vm(self) -> None:
        """Steps 1-4 of the build order (module docstring) on ``self.vm``."""
        vm = self.vm
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        if self.config.sev:
            # Before any vCPU exists: the kernel refuses SEV_INIT once vCPUs were created.
            self.confidential = ConfidentialGuest.attach(self, self.incoming)
            vm = self.vm = self.confidential.kvm_vm
            self.config = dataclasses.replace(
                self.config, sev_platform=self.confidential.platform.name
            )
        self.memory.register(vm)
        cpuid = self.kvm.get_supported_cpuid()
        #: The CPUID table every vCPU got (raw kvm_cpuid_entry2 bytes); KVM keeps it as set.
        self.cpuid = b"".join(bytes(e) for e in cpuid)
        mmap_size = self.kvm.get_vcpu_mmap_size()
        for i in range(self.config.vcpus):
            vcpu = vm.create_vcpu(i, mmap_size)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(cpuid)
            if self.confidential is not None:
                self.confidential.register_vcpu(i)
        # Probed now, before any vCPU runs: later, a vCPU ioctl would wait for KVM_RUN.
        self.features = probe_features(self.kvm, self.vcpus[0])
        self._kernel_state = {"vm": VmComponent(vm)}
        for i, vcpu in enumerate(self.vcpus):
            self._kernel_state[f"vcpu/{i}"] = VcpuComponent(
                vcpu, i, self.features, self.cpuid, self._registers_protected
            )

    def adopt_cpuid(self, table: bytes) -> None:
        """Give every vCPU the CPUID ``table`` (raw kvm_cpuid_entry2 bytes: a hand-off's
        source's), before any of them ran: KVM accepts only an identical table afterwards.
        (The host's table differs with the host CPU that answered: its APIC ID.)"""
        for component in self._kernel_state.values():
            if isinstance(component, VcpuComponent):
                component.adopt_cpuid(table)
        self.cpuid = table

    def _registers_protected(self) -> bool:
        return self.confidential is not None and self.confidential.registers_protected

    def _build_group(self) -> None:
        self.group = VcpuGroup(self.vcpus, self._handle_exit)
        self.group.on_stop = self._guest_stopped

    def add_state(self, name: str, component: Persist) -> None:
        """Register a device's state component under ``name`` ("device/..."): saved and
        restored with the machine, after the kernel state, in the order devices were added."""
        if not name.startswith("device/") or name in self._device_state:
            raise MachineError(f"device state {name!r} is not a new 'device/...' name")
        self._device_state[name] = component

    def components(self) -> dict[str, Persist]:
        """The machine's state components by name, in restore order: the VM-wide kernel
        state first (clock, PIT and interrupt controllers, before any vCPU can run), then
        each vCPU, then the devices (their interrupt lines land on the restored controllers),
        then the SEV launch record (the SEV context itself moves after the commit)."""
        components = self._kernel_state | self._device_state
        if self.confidential is not None:
            components["sev/launch"] = self.confidential.persist()
        return components

    def _uart_irq(self, level: bool) -> None:
        self.vm.irq_line(COM1_IRQ, 1 if level else 0)

    # --- running -------------------------------------------------------------------------------

    def start(
        self, paused: bool = False, first_run: Callable[[int, Vcpu], None] | None = None
    ) -> None:
        """Start the vCPU, UART and device threads; ``paused``: parked until :meth:`resume`.
        A paused device's I/O thread is drained before it starts, so it reads no eventfd
        at all: on a hand-off's destination the source still serves the guest's kicks on
        the same eventfds. ``first_run``: see ``VcpuGroup.start`` (a hand-off's
        destination runs each vCPU once on a stub outside guest memory; no device sees it)."""
        if paused:
            self.uart.pause()
        self.uart.start()
        for device in self.virtio:
            if paused:
                device.drain()
            device.start()
        self.started_at = time.monotonic()
        if self.booted_at is None:
            self.booted_at = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.group.start(paused=paused, first_run=first_run)

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU outside KVM_RUN, stop the UART's output drain, then drain the
        virtio devices (each finishes the request it is on and starts no other): after
        this, no device state changes until :meth:`resume`. If the vCPUs do not park within
        ``timeout`` s, the group undoes its pause and raises PauseTimeout before anything
        else is touched; if a device does not drain within ``timeout`` s, everything is
        resumed and DeviceDrainTimeout (a PauseTimeout) is raised: either way the machine
        keeps running as before."""
        self.group.pause(timeout)
        self.uart.pause()
        t0 = time.monotonic_ns()
        for device in self.virtio:
            if not device.drain(timeout):
                # Its state could still change during an export: undo the whole pause.
                self.resume()
                raise DeviceDrainTimeout(
                    f"{device.name} did not stop its I/O within {timeout:g} s (a request "
                    "still in progress); the pause was undone and the guest runs as before"
                )
        self.drain_us = (time.monotonic_ns() - t0) // 1000

    def detach_interrupts(self) -> None:
        """A hand-off's source, in the pause (after :meth:`pause` drained the devices):
        deassign every device's irqfd, so that the destination can assign it (one irqfd per
        eventfd on the whole host). The ioeventfds stay: the destination registered its own
        on the same eventfds before the pause, and this VM drops these when it closes."""
        for device in self.virtio:
            device.detach_interrupt()

    def attach_interrupts(self) -> None:
        """Assign every device's irqfd that is not assigned: a hand-off's destination after
        the state import (after KVM_SET_IRQCHIP and KVM_SET_LAPIC, which would overwrite an
        interrupt injected before them) and after the commit point (the source let go of
        them); a source whose hand-off failed, before it resumes. An interrupt signalled
        while none was assigned is injected now, once."""
        for device in self.virtio:
            device.attach_interrupt()

    def resume(self) -> None:
        for device in self.virtio:
            device.resume()
        self.uart.resume()
        self.group.resume()

    @property
    def status(self) -> str:
        if self._stopped.is_set() or self.group.stopped:
            return "shutdown"
        return "paused" if self.group.paused else "running"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the guest stops by itself; True if it did."""
        return self._stopped.wait(timeout)

    def _guest_exit(self, code: int) -> None:
        self.exit_code = code
        self._guest_stopped()

    def _guest_stopped(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            if self.on_guest_stop is not None:
                self.on_guest_stop()

    def _handle_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """Handle one exit of ``vcpu``; False stops the vCPU. Device accesses go to the buses,
        which complete reads before this returns (the next KVM_RUN hands them to the guest)."""
        if isinstance(exit_, PortOut | PortIn):
            self.bus.dispatch(exit_)
            return not self._stopped.is_set()
        if isinstance(exit_, MmioWrite | MmioRead):
            self.mmio.dispatch(exit_)
            return True
        if isinstance(exit_, Halt):
            return True
        if isinstance(exit_, Shutdown):
            log.error("vCPU %d: the guest shut down (triple fault)", vcpu.vcpu_id)
        elif isinstance(exit_, InternalErrorExit):
            log.error(
                "vCPU %d: KVM internal error, suberror %d [%s]",
                vcpu.vcpu_id,
                exit_.suberror,
                " ".join(f"{word:#x}" for word in exit_.data),
            )
        elif isinstance(exit_, FailEntry):
            log.error("vCPU %d: VM entry failed, reason %#x", vcpu.vcpu_id, exit_.hardware_reason)
        elif isinstance(exit_, SystemEvent):
            log.info("vCPU %d: system event %d", vcpu.vcpu_id, exit_.type)
        else:
            log.error("vCPU %d: unexpected exit %r", vcpu.vcpu_id, exit_)
        return False

    # --- queries -------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The control API's ``query-vm``: what the VMM knows of the VM. Nothing here reads
        guest memory (the service adds the built-in guests' own view, see
        :mod:`intrahost.vmm.guests.probe`)."""
        info: dict[str, Any] = {
            "memory": self.config.memory,
            "memory-backend": self.memory.path or "memfd",
            "vcpus": self.config.vcpus,
            "guest": self.config.guest,
            "status": self.status,
            "uptime": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "guest-uptime": (
                round(time.clock_gettime(time.CLOCK_BOOTTIME) - self.booted_at, 3)
                if self.booted_at is not None
                else 0.0
            ),
            "exits": list(self.group.exits),
            "serial-bytes": self.uart.bytes_written,
            "serial-dropped": self.uart.console_dropped,
            "pid": os.getpid(),
        }
        if self.exit_code is not None:
            info["exit-code"] = self.exit_code
        if self.config.disks:
            info["disks"] = len(self.config.disks)
        if self.config.nets:
            info["nets"] = len(self.config.nets)
        if self.confidential is not None:
            record = self.confidential.record
            info["sev"] = {"mode": self.confidential.mode, "platform": self.config.sev_platform}
            if record is not None:
                info["sev"] |= record.to_dict()
        return info

    def query_block(self) -> list[dict[str, Any]]:
        """The control API's ``query-block``: each disk, its image and its counters."""
        out = []
        for device in self.virtio:
            if isinstance(device.backend, VirtioBlock):
                out.append(device.backend.query() | device.query())
        return out

    def query_net(self) -> list[dict[str, Any]]:
        """The control API's ``query-net``: each network device, its tap and its counters."""
        out = []
        for device in self.virtio:
            if isinstance(device.backend, VirtioNet):
                out.append(device.backend.query() | device.query())
        return out

    # --- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the vCPU threads (the VM and memory stay until close())."""
        if getattr(self, "group", None) is not None:
            self.group.stop()
        self._stopped.set()

    def close(self) -> None:
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        if hasattr(self, "group"):
            self.group.stop()
        if hasattr(self, "uart"):
            self.uart.close()
        for device in self.virtio:
            device.close(vm_closing=True)
        for image in self._pending_images:
            image.close()
        for tap in self._pending_taps:
            tap.close()
        if self._console is not None:  # given, but the build failed before the UART took it
            self._console.close()
            self._console = None
        for fds in self._pending_fds:
            for fd in fds.values():
                os.close(fd)
        self._pending_fds.clear()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        if self.confidential is not None:
            self.confidential.close()
        self.memory.close()
        if self._owns_kvm:
            self.kvm.close()


def open_disks(config: MachineConfig) -> list[DiskImage]:
    """Open and lock every disk image of ``config``, in order; on a failure the ones already
    open are closed and the error (DiskImageError, DiskLockedError) names the image."""
    images: list[DiskImage] = []
    try:
        for disk in config.disks:
            images.append(DiskImage.open(disk.path, readonly=disk.readonly, direct=disk.direct))
    except BaseException:
        for image in images:
            image.close()
        raise
    return images


def open_taps(config: MachineConfig) -> list[Tap]:
    """Open (``tap=NAME``) or adopt (``fd=N``) every tap of ``config``, in order; on a
    failure the ones already open are closed and the TapError names the tap."""
    taps: list[Tap] = []
    try:
        for net in config.nets:
            if net.fd is not None:
                taps.append(Tap.from_fd(net.fd, f"--net fd={net.fd}"))
            else:
                taps.append(Tap.open(net.tap))
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


def disk_fd_names() -> tuple[str, ...]:
    """The host fds of a disk's device, by name, as a hand-off passes them."""
    return ("image", "irq", "notify/0")


def net_fd_names() -> tuple[str, ...]:
    """The host fds of a network device, by name, as a hand-off passes them."""
    return ("tap", "irq", "notify/0", "notify/1")


def device_fd_names(config: MachineConfig, n: int) -> tuple[str, ...]:
    """The host fds virtio device ``n`` of ``config`` carries in a hand-off."""
    return disk_fd_names() if n < len(config.disks) else net_fd_names()


def inherited_image(fd: int, disk: DiskConfig) -> DiskImage:
    """The image of ``disk`` on an fd inherited from another VMM (owned from now on): its
    open file description holds the image's lock; O_DIRECT is as the source opened it."""
    direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    return DiskImage.from_fd(fd, disk.path, readonly=disk.readonly, direct=direct)


def _current_vcpu() -> int:
    name = threading.current_thread().name
    return int(name[4:]) if name.startswith("vcpu") and name[4:].isdigit() else 0
