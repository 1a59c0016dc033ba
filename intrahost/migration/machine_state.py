"""A whole machine's saved state as envelope components, and its import.

Component names (the envelope's contract between VMM versions)::

    config                      JSON  MachineConfig of the source (required)
    vm/meta                     JSON  {clock_saved_at_ns}
    vm/clock vm/pic_master vm/pic_slave vm/ioapic vm/pit      raw kernel structs
    vcpu/N/meta                 JSON  {mp_state, sregs2, tsc_khz, tsc_offset, saved_at_ns}
    vcpu/N/msrs                       kvm_msr_entry array (format 1.1: "msrs" in the meta)
    vcpu/N/cpuid|regs|sregs|xsave|xcrs|debugregs|lapic|events raw kernel structs
                                      (register parts absent for a protected vCPU)
    vmm/run-state               JSON  {running}: whether the guest ran before the pause
    sev/launch                  JSON  SEV guests: mode, platform, policy, handle, measurement
    device/uart device/debug    JSON  device state records
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from intrahost.kvm import uapi
from intrahost.kvm.constants import MAX_CPUID_ENTRIES
from intrahost.migration import envelope
from intrahost.migration.envelope import Component, State, StateFormatError
from intrahost.migration.state import (
    StateImportError,
    VcpuState,
    VmState,
    restore_vcpu,
    restore_vm,
    save_vcpu,
    save_vm,
)
from intrahost.vmm.devices.debugport import DebugPortState
from intrahost.vmm.devices.uart import UartState
from intrahost.vmm.machine import Machine, MachineConfig, MachineConfigError

#: The component name prefixes this VMM understands (see envelope.decode).
UNDERSTOOD = ("config", "vm/", "vcpu/", "device/", "vmm/", "sev/")

_MSR_ENTRY = struct.Struct("<IIQ")  # struct kvm_msr_entry
_VCPU_RAW = ("cpuid", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events")
_VM_RAW = ("clock", "pic_master", "pic_slave", "ioapic", "pit")


def save_machine(machine: Machine, running: bool = True) -> bytes:
    """Export a paused machine (every vCPU parked, the UART's drain paused). ``running``:
    whether the guest ran before the hand-off paused it (it runs again after)."""
    vm_state = save_vm(machine.vm)
    protected = machine.confidential is not None and machine.confidential.registers_protected
    vcpu_states = [
        save_vcpu(v, i, machine.features, machine.cpuid, protected=protected)
        for i, v in enumerate(machine.vcpus)
    ]
    components = [Component("config", envelope.json_payload(machine.config.to_dict()))]
    components.append(
        Component(
            "vm/meta", envelope.json_payload({"clock_saved_at_ns": vm_state.clock_saved_at_ns})
        )
    )
    components += [Component(f"vm/{name}", getattr(vm_state, name)) for name in _VM_RAW]
    for s in vcpu_states:
        meta = {
            "mp_state": s.mp_state,
            "sregs2": s.sregs2,
            "tsc_khz": s.tsc_khz,
            "tsc_offset": s.tsc_offset,
            "saved_at_ns": s.saved_at_ns,
        }
        components.append(Component(f"vcpu/{s.index}/meta", envelope.json_payload(meta)))
        msrs = b"".join(_MSR_ENTRY.pack(index, 0, value) for index, value in s.msrs)
        components.append(Component(f"vcpu/{s.index}/msrs", msrs))
        for name in _VCPU_RAW:
            value = getattr(s, name)
            if value is not None:
                components.append(Component(f"vcpu/{s.index}/{name}", value))
    components.append(
        Component("device/uart", envelope.json_payload(machine.uart.save().to_dict()))
    )
    components.append(
        Component("device/debug", envelope.json_payload(machine.debug.save().to_dict()))
    )
    components.append(
        Component("vmm/run-state", envelope.json_payload({"running": running}), required=False)
    )
    if machine.confidential is not None and machine.confidential.record is not None:
        record = machine.confidential.record.to_dict()
        components.append(Component("sev/launch", envelope.json_payload(record)))
    return envelope.encode(components)


def warm_up_export(machine: Machine) -> None:
    """Run, before the pause, what the export will run for the first time: ctypes types of
    this VM's MSR list and CPUID, the VM-level getters (they don't wait for vCPUs), the JSON
    and envelope encoders. A cold first export costs about twice a warm one."""
    from intrahost.kvm import uapi

    uapi.flex(uapi.kvm_msrs, uapi.kvm_msr_entry, len(machine.features.msr_indices))
    vm_state = save_vm(machine.vm)
    envelope.encode(
        [
            Component("config", envelope.json_payload(machine.config.to_dict())),
            Component("vm/pit", vm_state.pit),
        ]
    )


def warm_up_import(machine: Machine) -> None:
    """On a built destination whose vCPUs never ran: export its own fresh state and import it
    back (a no-op for the machine), so the real import after the pause runs warm."""
    restore_machine(machine, decode_state(save_machine(machine)))


def decode_state(data: bytes) -> State:
    return envelope.decode(data, UNDERSTOOD)


def config_of(state: State) -> MachineConfig:
    try:
        return MachineConfig.from_dict(state.need_json("config"))
    except MachineConfigError as e:
        raise StateFormatError(f"component 'config': {e}") from None


def _sized(name: str, data: bytes | None, kind: type[ctypes.Structure]) -> None:
    """StateFormatError unless ``data`` is None or exactly one ``kind`` struct."""
    if data is not None and len(data) != ctypes.sizeof(kind):
        raise StateFormatError(
            f"component {name!r} holds {len(data)} bytes; a {kind.__name__} has "
            f"{ctypes.sizeof(kind)}"
        )


def _int(meta: dict[str, Any], key: str, name: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StateFormatError(f"component {name!r}: {key!r} must be an integer")
    return value


def vcpu_state(state: State, index: int) -> VcpuState:
    name = f"vcpu/{index}/meta"
    meta = state.need_json(name)
    packed = state.get(f"vcpu/{index}/msrs")
    if packed is not None:  # kvm_msr_entry array (format 1.2 on)
        if len(packed) % _MSR_ENTRY.size:
            raise StateFormatError(f"component 'vcpu/{index}/msrs' is not a kvm_msr_entry array")
        msrs: Any = [[i, v] for i, _reserved, v in _MSR_ENTRY.iter_unpack(packed)]
    else:  # format 1.1: a JSON list of [index, value] in the meta
        msrs = meta.get("msrs")
    if not isinstance(msrs, list) or not all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m) for m in msrs
    ):
        raise StateFormatError(f"component {name!r}: 'msrs' must be a list of [index, value]")
    tsc_offset = meta.get("tsc_offset")
    if tsc_offset is not None and not isinstance(tsc_offset, int):
        raise StateFormatError(f"component {name!r}: 'tsc_offset' must be an integer or null")
    raw = {part: state.get(f"vcpu/{index}/{part}") for part in _VCPU_RAW}
    for part in ("cpuid", "lapic", "events"):
        if raw[part] is None:
            raise StateFormatError(
                f"the saved state lacks the required component 'vcpu/{index}/{part}'"
            )
    sregs2 = bool(meta.get("sregs2", False))
    structs: dict[str, type[ctypes.Structure]] = {
        "regs": uapi.kvm_regs,
        "sregs": uapi.kvm_sregs2 if sregs2 else uapi.kvm_sregs,
        "xcrs": uapi.kvm_xcrs,
        "debugregs": uapi.kvm_debugregs,
        "lapic": uapi.kvm_lapic_state,
        "events": uapi.kvm_vcpu_events,
    }
    for part, kind in structs.items():
        _sized(f"vcpu/{index}/{part}", raw[part], kind)
    entry = ctypes.sizeof(uapi.kvm_cpuid_entry2)
    cpuid = raw["cpuid"] or b""
    if len(cpuid) % entry or len(cpuid) > MAX_CPUID_ENTRIES * entry:
        raise StateFormatError(
            f"component 'vcpu/{index}/cpuid' holds {len(cpuid)} bytes: not a list of at most "
            f"{MAX_CPUID_ENTRIES} {entry}-byte entries"
        )
    for key in ("mp_state", "tsc_khz"):
        if not 0 <= _int(meta, key, name) < 1 << 32:
            raise StateFormatError(f"component {name!r}: {key!r} is out of range")
    return VcpuState(
        index=index,
        cpuid=raw["cpuid"] or b"",
        mp_state=_int(meta, "mp_state", name),
        regs=raw["regs"],
        sregs=raw["sregs"],
        sregs2=bool(meta.get("sregs2", False)),
        xsave=raw["xsave"],
        xcrs=raw["xcrs"],
        debugregs=raw["debugregs"],
        lapic=raw["lapic"] or b"",
        msrs=tuple((m[0], m[1]) for m in msrs),
        events=raw["events"] or b"",
        tsc_khz=_int(meta, "tsc_khz", name),
        tsc_offset=tsc_offset,
        saved_at_ns=_int(meta, "saved_at_ns", name),
    )


def vm_state(state: State) -> VmState:
    meta = state.need_json("vm/meta")
    structs: dict[str, type[ctypes.Structure]] = {
        "clock": uapi.kvm_clock_data,
        "pic_master": uapi.kvm_irqchip,
        "pic_slave": uapi.kvm_irqchip,
        "ioapic": uapi.kvm_irqchip,
        "pit": uapi.kvm_pit_state2,
    }
    raw = {name: state.need(f"vm/{name}") for name in _VM_RAW}
    for name, kind in structs.items():
        _sized(f"vm/{name}", raw[name], kind)
    return VmState(clock_saved_at_ns=_int(meta, "clock_saved_at_ns", "vm/meta"), **raw)


def restore_machine(machine: Machine, state: State) -> None:
    """Import a decoded state into a built, never-run machine.

    Order: everything is decoded and validated first (a malformed state touches nothing);
    then the VM-wide state (the clock before any vCPU can run), then each vCPU, then the
    devices.
    """
    vcpus = [vcpu_state(state, i) for i in range(len(machine.vcpus))]
    indices = {n: n.split("/")[1] for n in state.names("vcpu/")}
    bad = [n for n, i in indices.items() if not (i.isascii() and i.isdigit())]
    if bad:
        raise StateFormatError(f"state component {bad[0]!r} does not name a vCPU by number")
    extra = [n for n, i in indices.items() if int(i) >= len(machine.vcpus)]
    if extra:
        raise StateImportError(
            f"the state holds {len(extra)} components of vCPUs this machine lacks"
        )
    vm = vm_state(state)
    try:
        uart = UartState.from_dict(state.need_json("device/uart"))
        debug = DebugPortState.from_dict(state.need_json("device/debug"))
    except StateFormatError:
        raise
    except Exception as e:  # the device records validate their own fields
        raise StateFormatError(f"device state: {e}") from e
    restore_vm(machine.vm, vm)
    for vcpu, s in zip(machine.vcpus, vcpus, strict=True):
        restore_vcpu(vcpu, s, machine.features, machine.cpuid)
    machine.uart.restore(uart)
    machine.debug.restore(debug)
    if machine.confidential is not None and state.get("sev/launch") is not None:
        from intrahost.vmm.confidential import LaunchRecord

        machine.confidential.record = LaunchRecord.from_dict(state.need_json("sev/launch"))
