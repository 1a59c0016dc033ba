"""Saving and restoring the kernel-held state of a VM and its vCPUs.

Kernel structs are kept as their raw bytes (the KVM ABI is stable, so a newer VMM reads an
older VMM's bytes and the other way round). The order of the getters and setters matters;
it is written down once, here, where it is applied: see :func:`save_vcpu`,
:func:`restore_vcpu`, :func:`save_vm` and :func:`restore_vm`.

Time. Source and destination run on the same host, so they share the host's TSC and
CLOCK_MONOTONIC. The guest must see the hand-off as a short stall, not a frozen clock (a
snapshot restore) and not a jump:

* TSC: the destination vCPU gets the source vCPU's TSC offset (KVM_VCPU_TSC_OFFSET,
  guest TSC = host TSC + offset), so the guest TSC keeps running with the host's through the
  pause. Where the attribute is missing, the TSC MSR is written with the saved value plus the
  host ticks that elapsed since the save.
* kvmclock: KVM_SET_CLOCK gets the saved clock plus the CLOCK_MONOTONIC nanoseconds that
  elapsed since KVM_GET_CLOCK.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from intrahost.errors import IntrahostError
from intrahost.kvm import KvmError, Vcpu, Vm, uapi
from intrahost.kvm.constants import (
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
)
from intrahost.kvm.features import VcpuFeatures

MSR_IA32_TSC = 0x10


class StateImportError(IntrahostError):
    """The destination cannot take the saved state (the kernel refused part of it)."""


@dataclass(frozen=True)
class VcpuState:
    """Everything KVM holds for one vCPU. Register fields are None for a vCPU whose register
    state is protected (SEV-ES): it moves inside the platform, not through the VMM."""

    index: int
    cpuid: bytes
    mp_state: int
    regs: bytes | None
    sregs: bytes | None
    sregs2: bool
    xsave: bytes | None
    xcrs: bytes | None
    debugregs: bytes | None
    lapic: bytes
    msrs: tuple[tuple[int, int], ...]
    events: bytes
    tsc_khz: int
    tsc_offset: int | None
    saved_at_ns: int = field(default=0)


@dataclass(frozen=True)
class VmState:
    """VM-wide in-kernel state: kvmclock, the two PICs, the IOAPIC and the PIT."""

    clock: bytes
    clock_saved_at_ns: int
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes


def cpuid_entries(data: bytes) -> list[uapi.kvm_cpuid_entry2]:
    size = ctypes.sizeof(uapi.kvm_cpuid_entry2)
    return [uapi.kvm_cpuid_entry2.from_bytes(data[i : i + size]) for i in range(0, len(data), size)]


def save_vcpu(
    vcpu: Vcpu, index: int, features: VcpuFeatures, cpuid: bytes, *, protected: bool
) -> VcpuState:
    """Export one parked vCPU. Every vCPU of the VM must be parked outside KVM_RUN: reading
    VCPU_EVENTS while another vCPU runs could miss an event in flight. ``cpuid``: the table
    the VMM set on the vCPU (KVM never changes it, so it is not read back in the blackout).
    ``protected``: the vCPU's register state belongs to the SEV platform
    (``ConfidentialGuest.registers_protected``); the register parts are left out."""
    # MP_STATE first: reading it makes KVM accept pending INIT/SIPI events, which can change
    # the registers and the LAPIC; everything after must see the result.
    mp_state = vcpu.get_mp_state()
    regs = None if protected else bytes(vcpu.get_regs())
    if protected:
        sregs = None
    elif features.sregs2:
        sregs = bytes(vcpu.get_sregs2())
    else:
        sregs = bytes(vcpu.get_sregs())
    xsave = None if protected else vcpu.get_xsave(features.xsave_size)
    xcrs = None if protected else bytes(vcpu.get_xcrs())
    debugregs = None if protected else bytes(vcpu.get_debugregs())
    lapic = bytes(vcpu.get_lapic())
    msrs = vcpu.get_msrs(features.msr_indices)
    tsc_offset = vcpu.get_tsc_offset() if features.tsc_offset else None
    saved_at = time.monotonic_ns()
    # VCPU_EVENTS last: the getters above must not leave an exception or interrupt pending
    # that the saved events would then miss.
    events = bytes(vcpu.get_vcpu_events())
    return VcpuState(
        index=index,
        cpuid=cpuid,
        mp_state=mp_state,
        regs=regs,
        sregs=sregs,
        sregs2=features.sregs2,
        xsave=xsave,
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=lapic,
        msrs=tuple(sorted(msrs.items())),
        events=events,
        tsc_khz=vcpu.get_tsc_khz(),
        tsc_offset=tsc_offset,
        saved_at_ns=saved_at,
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState, features: VcpuFeatures, cpuid: bytes) -> None:
    """Import one vCPU's state into a fresh vCPU of the destination, before it first runs.
    ``cpuid``: the table this VMM already set on the vCPU when it built it."""
    try:
        _restore_vcpu(vcpu, state, features, cpuid)
    except KvmError as e:
        raise StateImportError(f"vCPU {state.index}: {e}") from e


def _restore_vcpu(vcpu: Vcpu, state: VcpuState, features: VcpuFeatures, cpuid: bytes) -> None:
    # CPUID first: it defines which features (XSAVE components, MSRs) the rest may use. The
    # destination set its own table when it built the vCPU; only a different one is set again.
    if state.cpuid != cpuid:
        vcpu.set_cpuid2(cpuid_entries(state.cpuid))
    # MP_STATE before the registers: setting it can reset parts of the vCPU (INIT).
    vcpu.set_mp_state(state.mp_state)
    if state.regs is not None:
        # REGS before VCPU_EVENTS: KVM_SET_REGS clears a pending exception.
        vcpu.set_regs(uapi.kvm_regs.from_bytes(state.regs))
    if state.sregs is not None:
        if state.sregs2 and features.sregs2:
            vcpu.set_sregs2(uapi.kvm_sregs2.from_bytes(state.sregs))
        elif state.sregs2:
            # An SREGS2 state on a host without SREGS2: the leading fields are shared.
            sregs = uapi.kvm_sregs.from_buffer_copy(
                state.sregs[: ctypes.sizeof(uapi.kvm_sregs) - 32].ljust(
                    ctypes.sizeof(uapi.kvm_sregs), b"\0"
                )
            )
            vcpu.set_sregs(sregs)
        else:
            vcpu.set_sregs(uapi.kvm_sregs.from_bytes(state.sregs))
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)
    if state.xcrs is not None:
        vcpu.set_xcrs(uapi.kvm_xcrs.from_bytes(state.xcrs))
    if state.debugregs is not None:
        vcpu.set_debugregs(uapi.kvm_debugregs.from_bytes(state.debugregs))
    # LAPIC after SREGS (SREGS carries the APIC base MSR that enables and places the LAPIC)
    # and before MSRS (the TSC-deadline MSR is only accepted by an enabled LAPIC).
    vcpu.set_lapic(uapi.kvm_lapic_state.from_bytes(state.lapic))
    if vcpu.get_tsc_khz() != state.tsc_khz:
        vcpu.set_tsc_khz(state.tsc_khz)
    msrs = [(i, v) for i, v in state.msrs if i in features.msr_indices]
    if state.tsc_offset is None or not features.tsc_offset:
        # No offset to copy: carry the TSC forward by the host ticks since the save.
        elapsed = max(0, time.monotonic_ns() - state.saved_at_ns)
        ticks = elapsed * state.tsc_khz // 1_000_000
        msrs = [(i, v + ticks if i == MSR_IA32_TSC else v) for i, v in msrs]
    written = vcpu.set_msrs(msrs)
    if written != len(msrs):
        raise StateImportError(
            f"vCPU {state.index}: KVM accepted {written} of {len(msrs)} MSRs; MSR "
            f"{msrs[written][0]:#x} was refused (the destination host's KVM differs)"
        )
    if state.tsc_offset is not None and features.tsc_offset:
        # After the TSC MSR write (which would recompute the offset): the same offset on the
        # same host TSC keeps the guest TSC running with host time across the pause.
        vcpu.set_tsc_offset(state.tsc_offset)
    # VCPU_EVENTS last: pending exceptions, interrupts and NMIs must survive every setter
    # above (SET_REGS and SET_SREGS can clear them).
    vcpu.set_vcpu_events(uapi.kvm_vcpu_events.from_bytes(state.events))


def save_vm(vm: Vm) -> VmState:
    """Export VM-wide state; every vCPU must be parked."""
    clock = vm.get_clock()
    saved_at = time.monotonic_ns()
    return VmState(
        clock=bytes(clock),
        clock_saved_at_ns=saved_at,
        pic_master=bytes(vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=bytes(vm.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=bytes(vm.get_irqchip(KVM_IRQCHIP_IOAPIC)),
        pit=bytes(vm.get_pit2()),
    )


def restore_vm(vm: Vm, state: VmState) -> None:
    """Import VM-wide state into the destination VM, before any of its vCPUs runs."""
    try:
        # PIT first, then the clock, then the interrupt controllers; all before any vCPU
        # runs, so the guest never observes a clock or a timer from before the import.
        vm.set_pit2(uapi.kvm_pit_state2.from_bytes(state.pit))
        clock = uapi.kvm_clock_data.from_bytes(state.clock)
        clock.clock += max(0, time.monotonic_ns() - state.clock_saved_at_ns)
        clock.flags = 0  # only the clock value is set; REALTIME/HOST_TSC are read-side flags
        vm.set_clock(clock)
        for chip in (state.pic_master, state.pic_slave, state.ioapic):
            vm.set_irqchip(uapi.kvm_irqchip.from_bytes(chip))
    except KvmError as e:
        raise StateImportError(f"VM state: {e}") from e


__all__ = [
    "StateImportError",
    "VcpuFeatures",
    "VcpuState",
    "VmState",
    "restore_vcpu",
    "restore_vm",
    "save_vcpu",
    "save_vm",
]
