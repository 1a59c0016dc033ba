"""Typed bindings to the KVM API: uapi mirrors, ioctl numbers, and one class per kernel object."""

from intrahost.kvm.constants import Cap, ExitReason, MpState
from intrahost.kvm.exits import (
    ExitCompletionError,
    FailEntry,
    Halt,
    InternalErrorExit,
    Interrupted,
    MmioRead,
    MmioWrite,
    OtherExit,
    PortIn,
    PortOut,
    Shutdown,
    SystemEvent,
    VcpuExit,
)
from intrahost.kvm.objects import DEV_KVM, Kvm, KvmError, KvmUnavailableError, Vcpu, Vm

__all__ = [
    "DEV_KVM",
    "Cap",
    "ExitCompletionError",
    "ExitReason",
    "FailEntry",
    "Halt",
    "InternalErrorExit",
    "Interrupted",
    "Kvm",
    "KvmError",
    "KvmUnavailableError",
    "MmioRead",
    "MmioWrite",
    "MpState",
    "OtherExit",
    "PortIn",
    "PortOut",
    "Shutdown",
    "SystemEvent",
    "Vcpu",
    "VcpuExit",
    "Vm",
]
