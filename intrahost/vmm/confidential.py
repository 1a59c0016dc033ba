"""SEV and SEV-ES guests in the VMM: the SEV context of a machine, its launch, and taking the
context over from another VMM (MOVE).

The machine's KVM VM is bound to an SEV VM of a platform (``intrahost.sev``): the kernel's
(the KVM VM itself) or the model's (a context held by the platform service,
``intrahost.sevmodel``, which this module makes available by importing it on attach). Order,
with the reason for each step:

1. attach and, on a new guest, SEV_INIT / SEV_ES_INIT — before any vCPU exists (the kernel
   refuses INIT once vCPUs were created); a destination of a hand-off does not init: MOVE
   requires a destination that is not SEV yet. From attach on, the machine uses the KVM VM
   object the platform gives back (the model's answers as the kernel's SEV VM does);
2. the vCPUs, each registered with the platform;
3. after the guest image is loaded: LAUNCH_START (policy), LAUNCH_UPDATE_DATA over the image,
   for SEV-ES LAUNCH_UPDATE_VMSA (from then on the vCPUs' register state belongs to the
   platform), LAUNCH_MEASURE, LAUNCH_FINISH.

Which initialisation (see :func:`choose_initialisation`): the legacy KVM_SEV_INIT /
KVM_SEV_ES_INIT on a default-type VM, also on a host whose ``KVM_CAP_VM_TYPES`` offers the
SEV VM types (Linux 6.10+), because a guest of those types cannot run after a MOVE.

Once an SEV-ES guest's vCPU state is protected (after LAUNCH_UPDATE_VMSA, or after the MOVE
of an SEV-ES context) the VMM does not read or write the vCPUs' registers:
:attr:`ConfidentialGuest.registers_protected` tells the state export to leave them out. (On
the default-type VM the kernel would answer those ioctls, with KVM's own copy rather than
the guest's state; on an SEV-ES-type VM it refuses them with EINVAL.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from intrahost.errors import IntrahostError
from intrahost.kvm import Vm
from intrahost.sev.interface import SEV_POLICY_ES, PlatformInfo, SevPlatform, SevVm, VmType
from intrahost.vmm.persist import JsonRecord, RecordState

if TYPE_CHECKING:
    from intrahost.vmm.machine import Machine

log = logging.getLogger(__name__)

MODES = ("sev", "sev-es")
IMAGE_BASE = 0x100000


class ConfidentialError(IntrahostError):
    """An SEV guest cannot be set up or taken over."""


@dataclass(frozen=True)
class Initialisation:
    """How a new SEV or SEV-ES guest is initialised: the ``KVM_CREATE_VM`` type (the default
    type means KVM_SEV_INIT / KVM_SEV_ES_INIT, an SEV type KVM_SEV_INIT2), and why."""

    vm_type: VmType
    reason: str


def choose_initialisation(info: PlatformInfo) -> Initialisation:
    """The initialisation of a guest this VMM may hand off, by the host's VM types.

    Where ``KVM_CAP_VM_TYPES`` offers no SEV type (before Linux 6.10), the legacy commands on
    a default-type VM are the only way. Where it does, they are still the way: a MOVE does
    not carry ``need_init`` (``sev_migrate_from`` in ``sev.c``), and a destination of an SEV
    type starts with it set (``svm_vm_init``) and can never clear it (KVM_SEV_INIT2 is refused
    on a VM that is already an SEV guest), so ``svm_vcpu_pre_run`` refuses KVM_RUN there with
    EINVAL for good. A MOVE also needs both VMs of the same type, so the destination cannot
    be of the default type either. A default-type destination has no ``need_init`` and runs.
    """
    offered = [t for t in (VmType.SEV, VmType.SEV_ES, VmType.SNP) if t in info.supported_vm_types]
    if not offered:
        return Initialisation(
            VmType.DEFAULT,
            "KVM_SEV_INIT/KVM_SEV_ES_INIT on a default-type VM: this platform offers no SEV VM "
            "type (KVM_CAP_VM_TYPES)",
        )
    return Initialisation(
        VmType.DEFAULT,
        "KVM_SEV_INIT/KVM_SEV_ES_INIT on a default-type VM, although the platform offers "
        f"{', '.join(t.name for t in offered)} (KVM_SEV_INIT2): a MOVE destination of an SEV "
        "VM type keeps need_init set and can never run",
    )


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

    def __init__(self, mode: str, platform: SevPlatform, vm: SevVm, kvm_vm: Vm) -> None:
        if mode not in MODES:
            raise ConfidentialError(f"unknown SEV mode {mode!r}: use --sev or --sev-es")
        self.mode = mode
        self.platform = platform
        self.vm = vm
        #: The KVM VM object the machine uses from attach on (the platform's).
        self.kvm_vm = kvm_vm
        self.record: LaunchRecord | None = None
        #: Whether the vCPUs' register state belongs to the platform (SEV-ES, launched or
        #: moved in): KVM refuses the register getters and setters, so the state export
        #: leaves the registers out (they move inside the platform).
        self.registers_protected = False

    @classmethod
    def attach(cls, machine: Machine, incoming: bool) -> ConfidentialGuest:
        """Bind ``machine.vm`` (no vCPUs yet) to a new SEV VM; init it unless ``incoming``.
        The machine must use :attr:`kvm_vm` in place of its VM afterwards."""
        # The platforms are imported here, for SEV guests only: at the top they would cost
        # every VMM's start-up (a hand-off's destination's too) the model's import.
        import intrahost.sevmodel  # noqa: F401  (importing it registers the "model" platform)
        from intrahost.sev.platforms import open_platform

        config = machine.config
        platform = open_platform(config.sev_platform)
        init = choose_initialisation(platform.info)
        log.info("SEV initialisation: %s", init.reason)
        # The machine's KVM VM was created with the default type, which is init.vm_type.
        vm, kvm_vm = platform.attach(machine.vm, init.vm_type)
        guest = cls(config.sev, platform, vm, kvm_vm)
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

    def handoff_refusal(self) -> str | None:
        """Why this guest cannot be handed off (checked before the pause), or None.

        * SEV-SNP: KVM refuses to MOVE an SNP context (EINVAL: its SNP state, the guest
          request buffers and the SNP firmware context, would not move with it), so the
          destination could never take the guest;
        * a VM of an SEV type (KVM_SEV_INIT2): the destination could take the context but
          never run it (see :func:`choose_initialisation`).
        """
        vm_type = self.vm.vm_type
        if vm_type == VmType.SNP:
            return (
                "an SEV-SNP guest cannot be handed off: KVM refuses to move an SNP encryption "
                "context (KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM answers EINVAL, since the SNP "
                "state would not move with it); the guest stays here"
            )
        if vm_type != VmType.DEFAULT:
            return (
                f"this {self.mode} guest was initialised with KVM_SEV_INIT2 on a VM of type "
                f"{vm_type.name}: after a MOVE its destination could never run (KVM does not "
                "move need_init); only guests initialised with KVM_SEV_INIT/KVM_SEV_ES_INIT "
                "can be handed off. The guest stays here"
            )
        return None

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
            self.vm.launch_update_vmsa()
            self.registers_protected = True
        measurement = self.vm.launch_measure()
        self.vm.launch_finish()
        self.record = LaunchRecord(self.mode, self.platform.name, policy, handle, measurement.hex())
        log.info("SEV launch measurement %s", self.record.measurement)
        return self.record

    # --- hand-off --------------------------------------------------------------------------------

    def move_from(self, machine: Machine, src_fd: int) -> None:
        """KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: take the context of the VM behind ``src_fd``.
        The point of no return: the source VM is dead afterwards."""
        self.vm.move_enc_context_from(src_fd)
        if self.es:
            self.registers_protected = True

    def close(self) -> None:
        self.vm.close()
        self.platform.close()
