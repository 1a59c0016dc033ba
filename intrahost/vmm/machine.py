"""A VM assembled from the pieces: KVM objects, guest memory, vCPU threads and devices.

Build order (also the destination's order during a hand-off, all of it before the pause):

1. KVM_CREATE_VM, the TSS and identity-map pages (placed in the hole below 4 GiB);
2. the in-kernel irqchip (PIC, IOAPIC, per-vCPU LAPIC) and PIT;
3. the memory slots — after the irqchip, because the first slot registered after
   KVM_CREATE_IRQCHIP waits for an RCU grace period (5-8 ms on these hosts);
4. the vCPUs, each with the host's supported CPUID;
5. the devices on the I/O bus: COM1 (IRQ 4) and the debug port.

A booted machine then loads its guest into memory and sets the boot vCPU's registers; a
machine built for an incoming hand-off instead imports the saved state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
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
from intrahost.vmm.config import MachineConfig as MachineConfig
from intrahost.vmm.config import MachineConfigError as MachineConfigError
from intrahost.vmm.devices.bus import IoBus, MmioBus
from intrahost.vmm.devices.console import open_console
from intrahost.vmm.devices.debugport import DebugPort
from intrahost.vmm.devices.uart import COM1_BASE, Uart16550
from intrahost.vmm.kvm_state import VcpuComponent, VmComponent
from intrahost.vmm.memory import GuestMemory
from intrahost.vmm.persist import Persist
from intrahost.vmm.vcpu import VcpuGroup

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
COM1_IRQ = 4


class MachineError(IntrahostError):
    """The machine cannot do what was asked in its current state."""


class Machine:
    """A VM with its memory, vCPU threads and devices."""

    def __init__(
        self,
        config: MachineConfig,
        memory: GuestMemory,
        kvm: Kvm | None = None,
        incoming: bool = False,
    ) -> None:
        """Build the machine on ``memory``. ``incoming``: for a hand-off's destination (an
        SEV context will be moved in, so the SEV VM is not initialised here)."""
        self.config = config
        self.incoming = incoming
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
        self.exit_code: int | None = None
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        #: Called (on a vCPU thread) when the guest stops by itself: exit port, shutdown,
        #: an internal error. The control API uses it to emit SHUTDOWN.
        self.on_guest_stop: Callable[[], None] | None = None
        #: Guest-physical MMIO: devices register here; unclaimed addresses read all ones.
        self.mmio = MmioBus()
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

        memory = GuestMemory.create(config.memory, config.memory_path)
        try:
            machine = cls(config, memory, kvm)
        except BaseException:
            memory.close()
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
        self.uart = Uart16550(
            open_console(self.config.serial),
            irq=self._uart_irq,
        )
        self.bus.register(COM1_BASE, self.uart.length, self.uart, "COM1")
        self.add_state("device/uart", self.uart.persist())
        self.bus.register(self.debug.base, self.debug.length, self.debug, "debug port")
        self.add_state("device/debug", self.debug.persist())
        self.debug.on_exit = self._guest_exit
        self._build_group()

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
        """Start the vCPU threads (see ``VcpuGroup.start``, also for ``first_run``)."""
        if paused:
            self.uart.pause()
        self.uart.start()
        self.started_at = time.monotonic()
        self.group.start(paused=paused, first_run=first_run)

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU outside KVM_RUN, then stop the UART's output drain. If the vCPUs
        do not park within ``timeout`` s, the group undoes its pause and raises PauseTimeout
        before the UART is touched: the machine keeps running as before."""
        self.group.pause(timeout)
        self.uart.pause()

    def resume(self) -> None:
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
            "exits": list(self.group.exits),
            "serial-bytes": self.uart.bytes_written,
            "serial-dropped": self.uart.console_dropped,
            "pid": os.getpid(),
        }
        if self.exit_code is not None:
            info["exit-code"] = self.exit_code
        if self.confidential is not None:
            record = self.confidential.record
            info["sev"] = {"mode": self.confidential.mode, "platform": self.config.sev_platform}
            if record is not None:
                info["sev"] |= record.to_dict()
        return info

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
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        if self.confidential is not None:
            self.confidential.close()
        self.memory.close()
        if self._owns_kvm:
            self.kvm.close()


def _current_vcpu() -> int:
    name = threading.current_thread().name
    return int(name[4:]) if name.startswith("vcpu") and name[4:].isdigit() else 0
