"""SEV and SEV-ES guests in the VMM: the SEV context of a machine, its launch, and taking the
context over from another VMM (MOVE).

The machine's KVM VM is bound to an SEV VM of a platform (``intrahost.sev``): the kernel's
(the KVM VM itself) or the model's (a context held by the platform service,
``intrahost.sevmodel``, which this module makes available by importing it). Order, with the
reason for each step:

1. attach and, on a new guest, SEV_INIT / SEV_ES_INIT — before any vCPU exists (the kernel
   refuses INIT once vCPUs were created); a destination of a hand-off does not init: MOVE
   requires a destination that is not SEV yet. From attach on, the machine uses the KVM VM
   object the platform gives back (the model's answers as the kernel's SEV VM does);
2. the vCPUs, each registered with the platform;
3. after the guest image is loaded: LAUNCH_START (policy), LAUNCH_UPDATE_DATA over the image,
   for SEV-ES LAUNCH_UPDATE_VMSA (from then on the vCPUs' register state belongs to the
   platform), LAUNCH_MEASURE, LAUNCH_FINISH.

Once an SEV-ES guest's vCPU state is protected (after LAUNCH_UPDATE_VMSA, or after the MOVE
of an SEV-ES context) the VMM can no longer read or write the vCPUs' registers:
:attr:`ConfidentialGuest.registers_protected` tells the state export to leave them out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import intrahost.sevmodel  # noqa: F401  (importing it registers the "model" platform)
from intrahost.errors import IntrahostError
from intrahost.kvm import Vm
from intrahost.sev.interface import SEV_POLICY_ES, SevPlatform, SevVm
from intrahost.sev.platforms import open_platform
from intrahost.vmm.persist import JsonRecord, RecordState

if TYPE_CHECKING:
    from intrahost.vmm.machine import Machine

log = logging.getLogger(__name__)

MODES = ("sev", "sev-es")
IMAGE_BASE = 0x100000


class ConfidentialError(IntrahostError):
    """An SEV guest cannot be set up or taken over."""


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
        config = machine.config
        platform = open_platform(config.sev_platform)
        vm, kvm_vm = platform.attach(machine.vm)
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
