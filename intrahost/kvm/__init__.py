"""Typed bindings to the KVM API: uapi mirrors, ioctl numbers, and one class per kernel object."""

from intrahost.kvm.constants import Cap, ExitReason, MpState
from intrahost.kvm.objects import DEV_KVM, Kvm, KvmError, KvmUnavailableError, Vcpu, Vm

__all__ = [
    "DEV_KVM",
    "Cap",
    "ExitReason",
    "Kvm",
    "KvmError",
    "KvmUnavailableError",
    "MpState",
    "Vcpu",
    "Vm",
]
