"""What the host's KVM offers for saving and restoring vCPU state, probed once per VM."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from intrahost.kvm import uapi
from intrahost.kvm.constants import KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, Cap
from intrahost.kvm.objects import Kvm, Vcpu


@dataclass(frozen=True)
class VcpuFeatures:
    """Probe before the vCPU first runs: a vCPU ioctl waits for a running KVM_RUN to return."""

    msr_indices: tuple[int, ...]
    xsave_size: int
    sregs2: bool
    tsc_offset: bool
    tsc_khz: int


def probe_features(kvm: Kvm, vcpu: Vcpu) -> VcpuFeatures:
    return VcpuFeatures(
        msr_indices=tuple(kvm.get_msr_index_list()),
        xsave_size=max(kvm.check_extension(Cap.XSAVE2), ctypes.sizeof(uapi.kvm_xsave)),
        sregs2=kvm.check_extension(Cap.SREGS2) > 0,
        tsc_offset=vcpu.has_device_attr(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET),
        tsc_khz=vcpu.get_tsc_khz(),
    )
