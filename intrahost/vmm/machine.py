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
from dataclasses import asdict, dataclass
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.kvm import ExitReason, Kvm, Vcpu, Vm
from intrahost.kvm.constants import KVM_EXIT_IO_OUT
from intrahost.kvm.features import VcpuFeatures, probe_features
from intrahost.vmm.confidential import ConfidentialGuest
from intrahost.vmm.devices.bus import IoBus
from intrahost.vmm.devices.console import open_console
from intrahost.vmm.devices.debugport import DebugPort
from intrahost.vmm.devices.uart import COM1_BASE, Uart16550
from intrahost.vmm.memory import GuestMemory, MiB, parse_size
from intrahost.vmm.vcpu import VcpuGroup

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
COM1_IRQ = 4
MAX_VCPUS = 64


class MachineConfigError(IntrahostError):
    """The machine's configuration is invalid."""


class MachineError(IntrahostError):
    """The machine cannot do what was asked in its current state."""


@dataclass(frozen=True)
class MachineConfig:
    """What a VMM was asked to run. ``GUEST_VISIBLE`` fields change what the guest sees and
    must match across a hand-off; the others may differ on the new VMM."""

    memory: int = 256 * MiB
    vcpus: int = 1
    guest: str = "counter"
    guest_args: str = ""
    memory_path: str | None = None
    serial: str = "stdio"
    #: "" (a plain guest), "sev" or "sev-es".
    sev: str = ""
    #: The SEV platform: "auto" (the kernel's where it has SEV, else the model), "kernel",
    #: "model". A running machine's config names the platform it resolved to.
    sev_platform: str = "auto"
    sev_policy: int = 0

    GUEST_VISIBLE = ("memory", "vcpus", "guest", "guest_args", "sev")

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise MachineConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        if self.sev not in ("", "sev", "sev-es"):
            raise MachineConfigError(f"unknown SEV mode {self.sev!r}: use --sev or --sev-es")
        if self.sev_platform not in ("auto", "kernel", "model"):
            raise MachineConfigError("--platform must be auto, kernel or model")

    @property
    def cmdline(self) -> str:
        return f"cpus={self.vcpus} {self.guest_args}".strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineConfig:
        known = {
            "memory",
            "vcpus",
            "guest",
            "guest_args",
            "memory_path",
            "serial",
            "sev",
            "sev_platform",
            "sev_policy",
        }
        args = {k: v for k, v in data.items() if k in known}
        types = {
            "memory": int,
            "vcpus": int,
            "guest": str,
            "guest_args": str,
            "serial": str,
            "sev": str,
            "sev_platform": str,
            "sev_policy": int,
        }
        for key, typ in types.items():
            if key in args and not isinstance(args[key], typ):
                raise MachineConfigError(f"config field {key!r} must be {typ.__name__}")
        if args.get("memory_path") is not None and not isinstance(args["memory_path"], str):
            raise MachineConfigError("config field 'memory_path' must be a string")
        return cls(**args)

    def guest_differences(self, other: MachineConfig) -> list[str]:
        """The guest-visible fields in which ``other`` differs."""
        return [f for f in self.GUEST_VISIBLE if getattr(self, f) != getattr(other, f)]


def config_from_flags(
    memory: str = "256M",
    vcpus: int = 1,
    guest: str = "counter",
    guest_args: str = "",
    memory_path: str | None = None,
    serial: str = "stdio",
) -> MachineConfig:
    return MachineConfig(parse_size(memory), vcpus, guest, guest_args, memory_path, serial)


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
        self._mmio_warned: set[int] = set()
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
        self.bus.register(self.debug.base, self.debug.length, self.debug, "debug port")
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

    def _build_group(self) -> None:
        run = None
        if self.confidential is not None and self.confidential.wraps_runs:
            run = self.confidential.run
        self.group = VcpuGroup(self.vcpus, self._handle_exit, run)
        self.group.on_stop = self._guest_stopped

    def rebuild_vm(self) -> None:
        """Replace the KVM VM and vCPUs with fresh ones on the same memory and devices, for a
        context to be moved in (an SEV guest taken back after a failed hand-off). The vCPU
        threads must be parked; the new ones start parked."""
        self.group.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.confidential is not None:
            self.confidential.close()
            self.confidential = None
        self.vm.close()
        self.vm = self.kvm.create_vm()
        self.incoming = True
        self._build_vm()
        self._build_group()
        self.group.start(paused=True)

    def _uart_irq(self, level: bool) -> None:
        self.vm.irq_line(COM1_IRQ, 1 if level else 0)

    # --- running -------------------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        if paused:
            self.uart.pause()
        self.uart.start()
        self.started_at = time.monotonic()
        self.group.start(paused=paused)

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

    def _handle_exit(self, vcpu: Vcpu, reason: ExitReason | int) -> bool:
        run = vcpu.kvm_run
        if reason is ExitReason.IO:
            io = run.io
            buf = vcpu.run_buffer
            for i in range(io.count):
                at = io.data_offset + i * io.size
                if io.direction == KVM_EXIT_IO_OUT:
                    value = int.from_bytes(buf[at : at + io.size], "little")
                    self.bus.write(io.port, io.size, value)
                else:
                    value = self.bus.read(io.port, io.size)
                    buf[at : at + io.size] = value.to_bytes(io.size, "little")
            return not self._stopped.is_set()
        if reason is ExitReason.MMIO:
            mmio = run.mmio
            if mmio.phys_addr not in self._mmio_warned and len(self._mmio_warned) < 64:
                self._mmio_warned.add(mmio.phys_addr)
                log.warning(
                    "vCPU %d: unhandled MMIO %s at %#x (%d bytes)",
                    vcpu.vcpu_id,
                    "write" if mmio.is_write else "read",
                    mmio.phys_addr,
                    mmio.len,
                )
            if not mmio.is_write:
                for i in range(8):
                    mmio.data[i] = 0xFF
            return True
        if reason is ExitReason.HLT:
            return True
        if reason is ExitReason.SHUTDOWN:
            log.error("vCPU %d: the guest shut down (triple fault)", vcpu.vcpu_id)
        elif reason is ExitReason.INTERNAL_ERROR:
            internal = run.internal
            data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            log.error(
                "vCPU %d: KVM internal error, suberror %d [%s]",
                vcpu.vcpu_id,
                internal.suberror,
                data,
            )
        elif reason is ExitReason.FAIL_ENTRY:
            log.error(
                "vCPU %d: VM entry failed, reason %#x",
                vcpu.vcpu_id,
                run.fail_entry.hardware_entry_failure_reason,
            )
        elif reason is ExitReason.SYSTEM_EVENT:
            log.info("vCPU %d: system event %d", vcpu.vcpu_id, run.system_event.type)
        else:
            log.error("vCPU %d: unexpected exit %s", vcpu.vcpu_id, reason)
        return False

    # --- queries -------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The control API's ``query-vm``."""
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
        from intrahost.vmm.guests import layout

        try:
            status = layout.read_status(self.memory.buffer)
        except IntrahostError:
            status = None
        if status is not None:
            info["counter"] = [
                {"vcpu": i, "count": s.counter, "max-gap-ticks": s.max_gap}
                for i, s in enumerate(status.slots)
            ]
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
