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

import functools

from intrahost.migration import envelope
from intrahost.migration.envelope import State
from intrahost.vmm.kvm_state import VCPU_RAW_PARTS
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
    format the state is written in (None: this VMM's newest). What can't change during the
    pause — the configuration's JSON, the component names, the run state — is built once
    (:func:`warm_up_export` builds it before)."""
    version = max(STATE_MINOR) if protocol_version is None else protocol_version
    if version not in STATE_MINOR:
        raise StateFormatError(f"no state format for protocol version {version}")
    entries = [(b"config", _config_json(machine.config), envelope.REQUIRED)]
    for name, component in machine.components().items():
        for part, payload in component.save_parts():
            entries.append((_entry_name(name, part), payload, envelope.REQUIRED))
    entries.append((b"vmm/run-state", _run_state(running, machine.booted_at), 0))
    if ADDED_IN:
        entries = [_for_version(e, version) for e in entries]
    return envelope.encode_entries(entries, minor=STATE_MINOR[version])


def _for_version(entry: tuple[bytes, bytes, int], version: int) -> tuple[bytes, bytes, int]:
    """``entry`` as a peer of protocol ``version`` gets it: optional if added later."""
    name, payload, flags = entry
    newer = any(
        name.startswith(prefix.encode()) and added > version for prefix, added in ADDED_IN.items()
    )
    return (name, payload, flags & ~envelope.REQUIRED) if newer else entry


@functools.lru_cache(maxsize=16)
def _run_state(running: bool, booted_at: float | None) -> bytes:
    """``vmm/run-state``'s payload: whether the guest ran, and when it first started."""
    run_state: dict[str, object] = {"running": running}
    if booted_at is not None:
        run_state["booted_at"] = booted_at
    return json_payload(run_state)


@functools.lru_cache(maxsize=1024)
def _entry_name(component: str, part: str) -> bytes:
    return envelope.entry_name(part_name(component, part))


@functools.lru_cache(maxsize=16)
def _config_json(config: MachineConfig) -> bytes:
    return config.to_json()


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
    envelope.encode_entries(
        [(b"config", _config_json(machine.config), envelope.REQUIRED)]
        + [(_entry_name("vm", part), payload, envelope.REQUIRED) for part, payload in vm_parts]
    )
    for name in machine.components():
        if name.startswith("vcpu/"):  # (their parts are not read before the pause)
            for part in ("meta", "msrs", *VCPU_RAW_PARTS):
                _entry_name(name, part)
    for running in (False, True):
        _run_state(running, machine.booted_at)


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
