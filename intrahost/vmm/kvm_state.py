"""The kernel-held state of a VM and of its vCPUs: saving, restoring, and their parts.

Kernel structs are kept as their raw bytes (the KVM ABI is stable, so a newer VMM reads an
older VMM's bytes and the other way round). The order of the getters and setters matters;
it is written down once, here, where it is applied: see :meth:`VcpuComponent.save`,
:meth:`VcpuComponent.restore` (and :data:`DEFERRED_MSRS`), :meth:`VmComponent.save` and
:meth:`VmComponent.restore`.

Parts (see ``intrahost.vmm.persist``)::

    vm/meta             JSON  {clock_saved_at_ns}
    vm/clock vm/pic_master vm/pic_slave vm/ioapic vm/pit          raw kernel structs
    vcpu/N/meta         JSON  {mp_state, sregs2, tsc_khz, tsc_offset, saved_at_ns}
    vcpu/N/msrs               kvm_msr_entry array, in write order (format 1.1: a JSON list
                              "msrs" of [index, value] in the meta instead)
    vcpu/N/cpuid|regs|sregs|xsave|xcrs|debugregs|lapic|events     raw kernel structs
                              (the register parts are absent for a protected vCPU)

Time. Source and destination run on the same host, so they share the host's TSC and
CLOCK_MONOTONIC. The guest must see the hand-off as a short stall, not a frozen clock (a
snapshot restore) and not a jump:

* TSC: the destination vCPU gets the source vCPU's TSC offset (KVM_VCPU_TSC_OFFSET,
  guest TSC = host TSC + offset), so the guest TSC keeps running with the host's through the
  pause; the TSC MSR is then not written. Where the attribute is missing, the TSC MSR is
  written with the saved value plus the host ticks that elapsed since the save.
* kvmclock: KVM_SET_CLOCK gets the saved clock plus the CLOCK_MONOTONIC nanoseconds that
  elapsed since KVM_GET_CLOCK.
"""

from __future__ import annotations

import array
import ctypes
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from intrahost.kvm import KvmError, Vcpu, Vm, uapi
from intrahost.kvm.constants import (
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    MAX_CPUID_ENTRIES,
)
from intrahost.kvm.features import VcpuFeatures
from intrahost.kvm.objects import MsrEntries, msr_buffer
from intrahost.vmm.persist import (
    Apply,
    JsonRecord,
    Parts,
    StateFormatError,
    StateImportError,
    bounded,
)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06

#: MSRs written after all the others, in this order (KVM_SET_MSRS applies its entries in
#: array order, so one call keeps the order):
#:
#: * IA32_TSC_DEADLINE after IA32_TSC (and after the TSC offset, set before the MSRs): KVM
#:   arms the deadline timer against the guest TSC of the moment it is written.
#: * KVM_ASYNC_PF_EN after KVM_ASYNC_PF_INT: enabling takes the interrupt vector the INT MSR
#:   set, and wakes pending faults with it.
#:
#: The other MSRs are independent of each other: IA32_TSC_ADJUST written by the host only
#: sets its value; EFER and the APIC base come with SREGS, before.
DEFERRED_MSRS = (MSR_IA32_TSC_DEADLINE, MSR_KVM_ASYNC_PF_EN)

_U32 = (1 << 32) - 1
_MSR_ENTRY = struct.Struct("<IIQ")  # struct kvm_msr_entry
VCPU_RAW_PARTS = ("cpuid", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events")
_VM_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "clock": uapi.kvm_clock_data,
    "pic_master": uapi.kvm_irqchip,
    "pic_slave": uapi.kvm_irqchip,
    "ioapic": uapi.kvm_irqchip,
    "pit": uapi.kvm_pit_state2,
}


def msr_write_order(indices: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``indices`` in the order KVM_SET_MSRS must write them: by index, then
    :data:`DEFERRED_MSRS` in their order."""
    deferred = [i for i in DEFERRED_MSRS if i in indices]
    return tuple(sorted(i for i in indices if i not in DEFERRED_MSRS)) + tuple(deferred)


@dataclass(slots=True)
class VcpuState:
    """Everything KVM holds for one vCPU. Register fields are None for a vCPU whose register
    state is protected (SEV-ES): it moves inside the platform, not through the VMM. (These
    and the meta records are built in the hand-off's pause: plain slotted classes, not
    frozen ones, whose construction costs four times as much.)"""

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
    #: The MSRs as a kvm_msr_entry array, in the order they were saved (the write order of
    #: the saving VMM).
    msrs: MsrEntries
    events: bytes
    tsc_khz: int
    tsc_offset: int | None
    saved_at_ns: int = field(default=0)


@dataclass(slots=True)
class VmState:
    """VM-wide in-kernel state: kvmclock, the two PICs, the IOAPIC and the PIT."""

    clock: bytes
    clock_saved_at_ns: int
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes


@dataclass(slots=True)
class VcpuMeta(JsonRecord, label="vCPU state"):
    """The ``vcpu/N/meta`` part."""

    saved_at_ns: int
    mp_state: int = bounded(_U32)
    tsc_khz: int = bounded(_U32)
    sregs2: bool = False
    tsc_offset: int | None = None


@dataclass(slots=True)
class VmMeta(JsonRecord, label="VM state"):
    """The ``vm/meta`` part."""

    clock_saved_at_ns: int


_META_JSON = '{"mp_state":%d,"saved_at_ns":%d,"sregs2":%s,"tsc_khz":%d,"tsc_offset":%s}'


def vcpu_meta_json(s: VcpuState) -> bytes:
    """``VcpuMeta(...).to_json()`` of ``s``, byte for byte, formatted directly: it is built
    in the pause, and the record's generic encoder costs ten times as much."""
    offset = "null" if s.tsc_offset is None else str(int(s.tsc_offset))
    sregs2 = "true" if s.sregs2 else "false"
    return (_META_JSON % (s.mp_state, s.saved_at_ns, sregs2, s.tsc_khz, offset)).encode()


def vm_meta_json(clock_saved_at_ns: int) -> bytes:
    """``VmMeta(clock_saved_at_ns).to_json()``, byte for byte, formatted directly (it is
    built in the pause)."""
    return b'{"clock_saved_at_ns":%d}' % clock_saved_at_ns


def decode_vcpu(parts: Parts, index: int) -> VcpuState:
    """Validate the parts of ``vcpu/N`` (sizes of the kernel structs, the meta record)."""
    data = parts.json("meta")
    meta = VcpuMeta.from_dict(data, where=f"component {parts.name('meta')!r}")
    packed = parts.get("msrs")
    msrs: MsrEntries
    if packed is not None:  # kvm_msr_entry array (format 1.2 on)
        if len(packed) % _MSR_ENTRY.size:
            raise StateFormatError(f"component {parts.name('msrs')!r} is not a kvm_msr_entry array")
        msrs = MsrEntries(packed)
    else:  # format 1.1: a JSON list of [index, value] in the meta
        listed = data.get("msrs")
        if not isinstance(listed, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m)
            for m in listed
        ):
            raise StateFormatError(
                f"component {parts.name('meta')!r}: 'msrs' must be a list of [index, value]"
            )
        try:
            msrs = MsrEntries(b"".join(_MSR_ENTRY.pack(m[0], 0, m[1]) for m in listed))
        except struct.error:
            raise StateFormatError(
                f"component {parts.name('meta')!r}: an MSR index or value is out of range"
            ) from None
    cpuid = parts.need("cpuid")
    entry = ctypes.sizeof(uapi.kvm_cpuid_entry2)
    if len(cpuid) % entry or len(cpuid) > MAX_CPUID_ENTRIES * entry:
        raise StateFormatError(
            f"component {parts.name('cpuid')!r} holds {len(cpuid)} bytes: not a list of at "
            f"most {MAX_CPUID_ENTRIES} {entry}-byte entries"
        )
    sregs = uapi.kvm_sregs2 if meta.sregs2 else uapi.kvm_sregs
    lapic = parts.struct("lapic", uapi.kvm_lapic_state)
    events = parts.struct("events", uapi.kvm_vcpu_events)
    assert lapic is not None and events is not None
    return VcpuState(
        index=index,
        cpuid=cpuid,
        mp_state=meta.mp_state,
        regs=parts.struct("regs", uapi.kvm_regs, required=False),
        sregs=parts.struct("sregs", sregs, required=False),
        sregs2=meta.sregs2,
        xsave=parts.get("xsave"),
        xcrs=parts.struct("xcrs", uapi.kvm_xcrs, required=False),
        debugregs=parts.struct("debugregs", uapi.kvm_debugregs, required=False),
        lapic=lapic,
        msrs=msrs,
        events=events,
        tsc_khz=meta.tsc_khz,
        tsc_offset=meta.tsc_offset,
        saved_at_ns=meta.saved_at_ns,
    )


# --- one vCPU -------------------------------------------------------------------------------


class VcpuComponent:
    """``vcpu/N``: one vCPU's kernel state, with what saving and restoring it needs.
    ``cpuid``: the table the VMM set on the vCPU when it built it (KVM never changes it, so
    it is not read back in the blackout)."""

    def __init__(
        self,
        vcpu: Vcpu,
        index: int,
        features: VcpuFeatures,
        cpuid: bytes,
        protected: Callable[[], bool] = lambda: False,
    ) -> None:
        self.vcpu = vcpu
        self.index = index
        self.features = features
        self.cpuid = cpuid
        #: Whether the vCPU's register state is protected (SEV-ES, once launched or moved
        #: in): KVM then refuses the register getters and setters, so they are left out.
        self.protected = protected
        #: The MSRs this host's KVM saves, in write order; saved in that order too.
        self.msr_order = msr_write_order(features.msr_indices)
        self.known_msrs = frozenset(features.msr_indices)
        #: The vCPU's TSC frequency as last set (KVM keeps it): saves reading it back.
        self.tsc_khz = features.tsc_khz
        #: Built once: the KVM_GET_MSRS buffer, and this host's write order as the index
        #: column of a kvm_msr_entry array (a state saved in that order, the usual case on
        #: one host, is written back as it came, without a Python object per MSR).
        self._msr_buffer = msr_buffer(self.msr_order)
        self._msr_order_column = memoryview(array.array("I", self.msr_order))
        self._tsc_at = self.msr_order.index(MSR_IA32_TSC) if MSR_IA32_TSC in self.msr_order else -1

    def adopt_cpuid(self, table: bytes) -> None:
        """Set ``table`` on the vCPU (before it first ran) and keep it as this vCPU's."""
        entry = ctypes.sizeof(uapi.kvm_cpuid_entry2)
        if not table or len(table) % entry or len(table) > MAX_CPUID_ENTRIES * entry:
            raise StateImportError(f"a CPUID table of {len(table)} bytes is malformed")
        try:
            self.vcpu.set_cpuid_table(table)
        except KvmError as e:
            raise StateImportError(f"vCPU {self.index}: {e}") from e
        self.cpuid = table

    def save(self) -> VcpuState:
        """Export the parked vCPU. Every vCPU of the VM must be parked outside KVM_RUN:
        reading VCPU_EVENTS while another vCPU runs could miss an event in flight."""
        vcpu, features = self.vcpu, self.features
        # MP_STATE first: reading it makes KVM accept pending INIT/SIPI events, which can
        # change the registers and the LAPIC; everything after must see the result.
        mp_state = vcpu.get_mp_state()
        protected = self.protected()
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
        msrs = vcpu.read_msrs(self._msr_buffer)
        tsc_offset = vcpu.get_tsc_offset() if features.tsc_offset else None
        saved_at = time.monotonic_ns()
        # VCPU_EVENTS last: the getters above must not leave an exception or interrupt
        # pending that the saved events would then miss.
        events = bytes(vcpu.get_vcpu_events())
        return VcpuState(
            index=self.index,
            cpuid=self.cpuid,
            mp_state=mp_state,
            regs=regs,
            sregs=sregs,
            sregs2=features.sregs2,
            xsave=xsave,
            xcrs=xcrs,
            debugregs=debugregs,
            lapic=lapic,
            msrs=msrs,
            events=events,
            tsc_khz=self.tsc_khz,
            tsc_offset=tsc_offset,
            saved_at_ns=saved_at,
        )

    def restore(self, state: VcpuState) -> None:
        """Import ``state`` into this fresh vCPU, before it first runs."""
        try:
            self._restore(state)
        except KvmError as e:
            raise StateImportError(f"vCPU {state.index}: {e}") from e

    def _restore(self, state: VcpuState) -> None:
        vcpu, features = self.vcpu, self.features
        # CPUID first: it defines which features (XSAVE components, MSRs) the rest may use.
        # The vCPU got this VMM's table when it was built; only a different one is set again.
        if state.cpuid != self.cpuid:
            vcpu.set_cpuid_table(state.cpuid)
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
        # LAPIC after SREGS (SREGS carries the APIC base MSR that enables and places the
        # LAPIC) and before MSRS (the TSC-deadline MSR is only accepted by an enabled LAPIC
        # in TSC-deadline mode).
        vcpu.set_lapic(uapi.kvm_lapic_state.from_bytes(state.lapic))
        # TSC_KHZ before anything that sets the TSC: KVM scales the TSC by the guest's
        # frequency.
        if self.tsc_khz != state.tsc_khz:
            vcpu.set_tsc_khz(state.tsc_khz)
            self.tsc_khz = state.tsc_khz
        copy_offset = state.tsc_offset is not None and features.tsc_offset
        if state.tsc_offset is not None and copy_offset:
            # The offset before the MSRs, and no IA32_TSC write (it would recompute the
            # offset): the same offset on the same host TSC keeps the guest TSC running with
            # host time across the pause, and TSC_DEADLINE is then armed against that TSC.
            vcpu.set_tsc_offset(state.tsc_offset)
        msrs = self._msrs_to_write(state, copy_offset)
        written = vcpu.set_msrs(msrs)
        if written != len(msrs):
            raise StateImportError(
                f"vCPU {state.index}: KVM accepted {written} of {len(msrs)} MSRs; MSR "
                f"{msrs[written][0]:#x} was refused (the destination host's KVM differs)"
            )
        # VCPU_EVENTS last: pending exceptions, interrupts and NMIs must survive every setter
        # above (SET_REGS and SET_SREGS can clear them).
        vcpu.set_vcpu_events(uapi.kvm_vcpu_events.from_bytes(state.events))

    def _msrs_to_write(
        self, state: VcpuState, copy_offset: bool
    ) -> MsrEntries | list[tuple[int, int]]:
        """The saved MSRs this host's KVM knows, in write order (:data:`DEFERRED_MSRS` last,
        whatever order the saving VMM used). IA32_TSC: left out when the offset is copied,
        else carried forward by the host ticks since the save.

        A state saved in this host's own write order (a VMM of this version on this host)
        is passed through as the raw array, only IA32_TSC's entry cut out."""
        raw = state.msrs.raw
        if copy_offset and memoryview(raw).cast("I")[::4] == self._msr_order_column:
            if self._tsc_at < 0:
                return state.msrs
            cut = self._tsc_at * _MSR_ENTRY.size
            return MsrEntries(raw[:cut] + raw[cut + _MSR_ENTRY.size :])
        known = self.known_msrs
        ticks = 0
        if not copy_offset:
            elapsed = max(0, time.monotonic_ns() - state.saved_at_ns)
            ticks = elapsed * state.tsc_khz // 1_000_000
        out: list[tuple[int, int]] = []
        deferred: dict[int, int] = {}
        for index, value in state.msrs:
            if index not in known:
                continue
            if index == MSR_IA32_TSC:
                if copy_offset:
                    continue
                value += ticks
            if index in DEFERRED_MSRS:
                deferred[index] = value
            else:
                out.append((index, value))
        out += [(i, deferred[i]) for i in DEFERRED_MSRS if i in deferred]
        return out

    def save_parts(self) -> list[tuple[str, bytes]]:
        s = self.save()
        out = [("meta", vcpu_meta_json(s)), ("msrs", s.msrs.raw)]
        for name in VCPU_RAW_PARTS:
            value = getattr(s, name)
            if value is not None:
                out.append((name, value))
        return out

    def load_parts(self, parts: Parts) -> Apply:
        state = decode_vcpu(parts, self.index)
        return lambda: self.restore(state)


# --- the VM ---------------------------------------------------------------------------------


class VmComponent:
    """``vm``: the VM-wide kernel state."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def save(self) -> VmState:
        """Export VM-wide state; every vCPU must be parked."""
        vm = self.vm
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

    def restore(self, state: VmState) -> None:
        """Import VM-wide state into this VM, before any of its vCPUs runs."""
        vm = self.vm
        try:
            # PIT first, then the clock, then the interrupt controllers; all before any vCPU
            # runs, so the guest never observes a clock or a timer from before the import.
            vm.set_pit2(uapi.kvm_pit_state2.from_bytes(state.pit))
            clock = uapi.kvm_clock_data.from_bytes(state.clock)
            clock.clock += max(0, time.monotonic_ns() - state.clock_saved_at_ns)
            clock.flags = 0  # only the value is set; REALTIME/HOST_TSC are read-side flags
            vm.set_clock(clock)
            for chip in (state.pic_master, state.pic_slave, state.ioapic):
                vm.set_irqchip(uapi.kvm_irqchip.from_bytes(chip))
        except KvmError as e:
            raise StateImportError(f"VM state: {e}") from e

    def save_parts(self) -> list[tuple[str, bytes]]:
        s = self.save()
        out = [("meta", vm_meta_json(s.clock_saved_at_ns))]
        out += [(name, getattr(s, name)) for name in _VM_STRUCTS]
        return out

    def load_parts(self, parts: Parts) -> Apply:
        state = decode_vm(parts)
        return lambda: self.restore(state)


def decode_vm(parts: Parts) -> VmState:
    """Validate the parts of ``vm`` (the meta record, the sizes of the kernel structs)."""
    meta = parts.record(VmMeta, "meta")
    raw = {name: parts.struct(name, kind) or b"" for name, kind in _VM_STRUCTS.items()}
    return VmState(clock_saved_at_ns=meta.clock_saved_at_ns, **raw)
