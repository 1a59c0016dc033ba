"""A whole machine's saved state as an envelope, and its import.

The machine lists its state components (``Machine.components``, see
``intrahost.vmm.persist``); each part of each becomes one envelope component, named
``COMPONENT/PART`` (or ``COMPONENT`` for a single unnamed part). With this module's own two,
the names are the envelope's contract between VMM versions::

    config                      JSON  MachineConfig of the source (required)
    vm/meta                     JSON  {clock_saved_at_ns}
    vm/clock vm/pic_master vm/pic_slave vm/ioapic vm/pit      raw kernel structs
    vcpu/N/meta                 JSON  {mp_state, sregs2, tsc_khz, tsc_offset, saved_at_ns}
    vcpu/N/msrs                       kvm_msr_entry array (format 1.1: "msrs" in the meta)
    vcpu/N/cpuid|regs|sregs|xsave|xcrs|debugregs|lapic|events raw kernel structs
                                      (register parts absent for a protected vCPU)
    device/uart device/debug    JSON  device state records
    sev/launch                  JSON  SEV guests: mode, platform, policy, handle, measurement
    vmm/run-state               JSON  {running, booted_at}: whether the guest ran before
                                      the pause, and when it first started (CLOCK_BOOTTIME
                                      seconds; optional, as is the component)

``vm`` and ``vcpu/N`` are described in ``intrahost.vmm.kvm_state``; a device's record in its
module. ``config`` is read before the destination machine exists (it says how to build it);
``vmm/run-state`` is the sender's.
"""

from __future__ import annotations

from intrahost.migration import envelope
from intrahost.migration.envelope import Component, State
from intrahost.vmm.machine import Machine, MachineConfig, MachineConfigError
from intrahost.vmm.persist import (
    Parts,
    StateFormatError,
    StateImportError,
    json_payload,
    part_name,
    prepare_records,
)

#: The component name prefixes this VMM understands (see envelope.decode).
UNDERSTOOD = ("config", "vm/", "vcpu/", "device/", "vmm/", "sev/")

#: The state format of each hand-off protocol version: the envelope's minor it is written
#: with (informative to the reader; see ``envelope``).
STATE_MINOR = {1: envelope.MINOR}
#: Components (by name prefix) added after protocol version 1, with the version that added
#: them. For a peer that speaks an older version they are written optional, so that it
#: ignores them instead of refusing the state. A component an older peer must not go
#: without needs a refusal before the pause instead. None yet: version 1 is what v0.1.0
#: reads.
ADDED_IN: dict[str, int] = {}


def save_machine(
    machine: Machine, running: bool = True, protocol_version: int | None = None
) -> bytes:
    """Export a paused machine (every vCPU parked, the UART's drain paused), its components
    in the machine's order. ``running``: whether the guest ran before the hand-off paused it
    (it runs again after). ``protocol_version``: the version agreed with the peer, whose
    format the state is written in (None: this VMM's newest)."""
    version = max(STATE_MINOR) if protocol_version is None else protocol_version
    if version not in STATE_MINOR:
        raise StateFormatError(f"no state format for protocol version {version}")
    components = [Component("config", machine.config.to_json())]
    for name, component in machine.components().items():
        prefix = name + "/"
        for part, payload in component.save_parts():
            components.append(Component(prefix + part if part else name, payload))
    run_state: dict[str, object] = {"running": running}
    if machine.booted_at is not None:
        run_state["booted_at"] = machine.booted_at
    components.append(Component("vmm/run-state", json_payload(run_state), required=False))
    if ADDED_IN:
        components = [_for_version(c, version) for c in components]
    return envelope.encode(components, minor=STATE_MINOR[version])


def _for_version(component: Component, version: int) -> Component:
    """``component`` as a peer of protocol ``version`` gets it: optional if added later."""
    newer = any(
        component.name.startswith(prefix) and added > version for prefix, added in ADDED_IN.items()
    )
    return Component(component.name, component.payload, False) if newer else component


def restore_machine(machine: Machine, state: State) -> None:
    """Import a decoded state into a built, never-run machine.

    Order: every component is decoded and validated first (a malformed state touches
    nothing); then each is applied in the machine's order (``Machine.components``: the
    VM-wide state, the vCPUs, the devices, the SEV launch record).
    """
    vcpus = len(machine.vcpus)
    indices = {n: n.split("/")[1] for n in state.names("vcpu/")}
    bad = [n for n, i in indices.items() if not (i.isascii() and i.isdigit())]
    if bad:
        raise StateFormatError(f"state component {bad[0]!r} does not name a vCPU by number")
    extra = [n for n, i in indices.items() if int(i) >= vcpus]
    if extra:
        raise StateImportError(
            f"the state holds {len(extra)} components of vCPUs this machine lacks"
        )
    appliers = [c.load_parts(Parts(state, name)) for name, c in machine.components().items()]
    for apply in appliers:
        apply()


def decode_state(data: bytes) -> State:
    return envelope.decode(data, UNDERSTOOD)


def config_of(state: State) -> MachineConfig:
    try:
        return MachineConfig.from_dict(state.need_json("config"))
    except MachineConfigError as e:
        raise StateFormatError(f"component 'config': {e}") from None


def warm_up_export(machine: Machine) -> None:
    """Run, before the pause, what the export will run for the first time: ctypes types of
    this VM's MSR list and CPUID, the record field lists, the VM-level getters (they don't
    wait for vCPUs), the JSON and envelope encoders. A cold first export costs about twice a
    warm one."""
    from intrahost.kvm import uapi

    prepare_records()
    uapi.flex(uapi.kvm_msrs, uapi.kvm_msr_entry, len(machine.features.msr_indices))
    vm_parts = machine.components()["vm"].save_parts()
    envelope.encode(
        [Component("config", machine.config.to_json())]
        + [Component(part_name("vm", part), payload) for part, payload in vm_parts]
    )


def warm_up_import(machine: Machine) -> None:
    """On a built destination whose vCPUs never ran: export its own fresh state and import it
    back (a no-op for the machine), so the real import after the pause runs warm."""
    restore_machine(machine, decode_state(save_machine(machine)))


__all__ = [
    "UNDERSTOOD",
    "StateFormatError",
    "StateImportError",
    "config_of",
    "decode_state",
    "restore_machine",
    "save_machine",
    "warm_up_export",
    "warm_up_import",
]
