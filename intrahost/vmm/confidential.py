"""SEV and SEV-ES guests in the VMM: the SEV context of a machine, its launch, the protected
vCPU run loop, and taking the context over from another VMM (MOVE).

The machine's KVM VM is bound to an SEV VM of a platform (``intrahost.sev``): the kernel's
(the KVM VM itself) or the model's (a context held by the platform service, tied to the KVM VM
by ``platform.attach``). Order, with the reason for each step:

1. attach and, on a new guest, SEV_INIT / SEV_ES_INIT — before any vCPU exists (the kernel
   refuses INIT once vCPUs were created); a destination of a hand-off does not init: MOVE
   requires a destination that is not SEV yet;
2. the vCPUs, each registered with the platform;
3. after the guest image is loaded: LAUNCH_START (policy), LAUNCH_UPDATE_DATA over the image,
   for SEV-ES LAUNCH_UPDATE_VMSA (from then on the vCPUs' register state belongs to the
   platform), LAUNCH_MEASURE, LAUNCH_FINISH.

On the model platform, an SEV-ES vCPU's registers live in its VMSA in the platform service: the
VMM loads them into the real vCPU before every KVM_RUN and saves them after it
(``vcpu_enter`` / ``vcpu_exit``, which also hold the platform's vCPU mutex while the vCPU runs,
as KVM holds ``vcpu->mutex``). The VMSA here is the raw bytes of kvm_regs, kvm_sregs, kvm_fpu,
kvm_xcrs and kvm_debugregs, in that order. On the kernel platform the hardware does all this.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from intrahost.errors import IntrahostError
from intrahost.kvm import ExitReason, Vcpu, uapi
from intrahost.sev.interface import SEV_POLICY_ES, SevPlatform, SevVm
from intrahost.sev.platforms import open_platform
from intrahost.vmm.persist import JsonRecord, RecordState

if TYPE_CHECKING:
    from intrahost.vmm.machine import Machine

log = logging.getLogger(__name__)

MODES = ("sev", "sev-es")
IMAGE_BASE = 0x100000

_VMSA_PARTS: tuple[type[uapi.Struct], ...] = (
    uapi.kvm_regs,
    uapi.kvm_sregs,
    uapi.kvm_fpu,
    uapi.kvm_xcrs,
    uapi.kvm_debugregs,
)
VMSA_SIZE = sum(ctypes.sizeof(t) for t in _VMSA_PARTS)


class ConfidentialError(IntrahostError):
    """An SEV guest cannot be set up or taken over."""


def capture_vmsa(vcpu: Vcpu) -> bytes:
    """The vCPU's register state as the model's VMSA blob."""
    with vcpu.platform_access():
        parts = (
            vcpu.get_regs(),
            vcpu.get_sregs(),
            vcpu.get_fpu(),
            vcpu.get_xcrs(),
            vcpu.get_debugregs(),
        )
    return b"".join(bytes(p) for p in parts)


def load_vmsa(vcpu: Vcpu, vmsa: bytes) -> None:
    if len(vmsa) != VMSA_SIZE:
        raise ConfidentialError(f"VMSA of {len(vmsa)} bytes, expected {VMSA_SIZE}")
    at = 0
    values = []
    for t in _VMSA_PARTS:
        size = ctypes.sizeof(t)
        values.append(t.from_bytes(vmsa[at : at + size]))
        at += size
    regs, sregs, fpu, xcrs, debugregs = values
    with vcpu.platform_access():
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        vcpu.set_fpu(fpu)
        vcpu.set_xcrs(xcrs)
        vcpu.set_debugregs(debugregs)


@dataclass(frozen=True)
class LaunchRecord(JsonRecord, label="SEV launch record"):
    """What the launch produced; carried by the VMM across hand-offs (the context itself
    moves inside the platform). ``measurement`` is the LAUNCH_MEASURE blob, hex."""

    mode: str
    platform: str
    policy: int
    handle: int
    measurement: str


class ConfidentialGuest:
    """The SEV context of one machine."""

    def __init__(self, mode: str, platform: SevPlatform, vm: SevVm) -> None:
        if mode not in MODES:
            raise ConfidentialError(f"unknown SEV mode {mode!r}: use --sev or --sev-es")
        self.mode = mode
        self.platform = platform
        self.vm = vm
        self.record: LaunchRecord | None = None
        #: Per vCPU, the VMSA this VMM last saved: the real vCPU still holds exactly that
        #: state, so loading it again is skipped (and must be: KVM_SET_REGS between an I/O exit
        #: and the KVM_RUN that completes the instruction would corrupt the emulation).
        self._in_vcpu: dict[int, bytes] = {}

    @classmethod
    def attach(cls, machine: Machine, incoming: bool) -> ConfidentialGuest:
        """Bind ``machine.vm`` (no vCPUs yet) to a new SEV VM; init it unless ``incoming``."""
        config = machine.config
        platform = open_platform(config.sev_platform)
        vm = platform.attach(machine.vm)
        guest = cls(config.sev, platform, vm)
        if not incoming:
            if config.sev == "sev-es":
                vm.sev_es_init()
            else:
                vm.sev_init()
        if platform.name == "model":
            log.warning(
                "SEV on the model platform: guest memory is NOT encrypted (no SEV hardware)"
            )
        return guest

    @property
    def es(self) -> bool:
        return self.mode == "sev-es"

    @property
    def wraps_runs(self) -> bool:
        """Whether KVM_RUN must go through vcpu_enter/vcpu_exit (the model platform)."""
        return self.platform.name == "model"

    def persist(self) -> RecordState[LaunchRecord]:
        """The ``sev/launch`` state component: the launch record (none before the launch; the
        context itself moves inside the platform, after the hand-off's commit)."""
        return RecordState(LaunchRecord, lambda: self.record, self._set_record, optional=True)

    def _set_record(self, record: LaunchRecord) -> None:
        self.record = record

    def register_vcpu(self, index: int) -> None:
        self.vm.create_vcpu(index)

    # --- launch --------------------------------------------------------------------------------

    def launch(self, machine: Machine, image_size: int, policy: int) -> LaunchRecord:
        """LAUNCH_START .. LAUNCH_FINISH over the loaded image (see the module docstring)."""
        if self.es:
            policy |= SEV_POLICY_ES
        handle = self.vm.launch_start(policy)
        length = (image_size + 15) & ~15
        self.vm.launch_update_data(machine.memory.address + IMAGE_BASE, length)
        if self.es:
            vmsas = [capture_vmsa(v) for v in machine.vcpus] if self.wraps_runs else None
            self.vm.launch_update_vmsa(vmsas)
            for vcpu in machine.vcpus:
                vcpu.protected = True
        measurement = self.vm.launch_measure()
        self.vm.launch_finish()
        self.record = LaunchRecord(self.mode, self.platform.name, policy, handle, measurement.hex())
        log.info("SEV launch measurement %s", self.record.measurement)
        return self.record

    # --- running -------------------------------------------------------------------------------

    def run(self, index: int, vcpu: Vcpu) -> ExitReason | int:
        """One KVM_RUN of a vCPU whose context the model platform holds."""
        vmsa = self.vm.vcpu_enter(index)
        saved: bytes | None = None
        try:
            if vmsa is not None and self._in_vcpu.get(index) != vmsa:
                load_vmsa(vcpu, vmsa)
            reason = vcpu.run()
            if vmsa is not None:
                saved = capture_vmsa(vcpu)
                self._in_vcpu[index] = saved
        finally:
            self.vm.vcpu_exit(index, saved)
        return reason

    # --- hand-off --------------------------------------------------------------------------------

    def move_from(self, machine: Machine, src_fd: int) -> None:
        """KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: take the context of the VM behind ``src_fd``.
        The point of no return: the source VM is dead afterwards."""
        self.vm.move_enc_context_from(src_fd)
        if self.es:
            for vcpu in machine.vcpus:
                vcpu.protected = True

    def close(self) -> None:
        self.vm.close()
        self.platform.close()
