"""AttachedVm / AttachedVcpu: the VMM's real KVM VM answering as the kernel's SEV VM would.

The SEV VM behind them is a stand-in here (the model service's part is tested with the
service in tests/sev/test_sev_kernel.py and end to end in tests/sev/test_sev_handoff.py).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from typing import Any

import pytest
from support import needs_kvm

from intrahost.kvm import Interrupted, Kvm, KvmError, uapi
from intrahost.sev.interface import SevError, VmType
from intrahost.sevmodel.attached import VMSA_SIZE, AttachedVcpu, AttachedVm


class StandInSevVm:
    """What AttachedVm asks of its model VM: liveness, and vcpu_enter / vcpu_exit."""

    def __init__(self, vm_type: VmType) -> None:
        self.fd = 1000
        self.vm_type = vm_type
        self.dead = False
        self.vmsa: bytes | None = None
        self.enter_error: SevError | None = None
        self.calls: list[tuple[Any, ...]] = []

    def is_dead(self) -> bool:
        return self.dead

    def vcpu_enter(self, index: int) -> bytes | None:
        self.calls.append(("enter", index))
        if self.enter_error is not None:
            raise self.enter_error
        return self.vmsa

    def vcpu_exit(self, index: int, vmsa: bytes | None = None) -> None:
        self.calls.append(("exit", index, vmsa))


@pytest.fixture(params=[VmType.SEV_ES])
def attached(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[StandInSevVm, AttachedVm, AttachedVcpu]]:
    """An attached VM with one vCPU; of the SEV-ES type unless parametrised otherwise."""
    sev = StandInSevVm(request.param)
    with Kvm() as kvm:
        plain = kvm.create_vm()
        with AttachedVm(plain.detach(), kvm, sev) as vm:  # type: ignore[arg-type]
            vm.set_tss_addr(0xFFFBD000)
            vm.set_identity_map_addr(0xFFFBC000)
            vm.create_irqchip()
            with vm.create_vcpu(0) as vcpu:
                assert isinstance(vcpu, AttachedVcpu) and vm.vcpus == [vcpu]
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
                yield sev, vm, vcpu


@needs_kvm
def test_protected_vcpu_refuses_register_access(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    """On an SEV-ES-type VM (x86.c: ``has_protected_state`` with ``guest_state_protected``,
    and for the FPU ``fpstate_is_confidential``, as LAUNCH_UPDATE_VMSA leaves a vCPU)."""
    _sev, vm, vcpu = attached
    assert vm.has_protected_state
    vcpu.protected = True
    vcpu.fpu_confidential = True
    for call in (vcpu.get_regs, vcpu.get_sregs, vcpu.get_debugregs, vcpu.get_fpu):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as info:
        vcpu.set_regs(uapi.kvm_regs())
    assert info.value.errno == errno.EINVAL
    vcpu.get_lapic()  # not register state: still the VMM's
    vcpu.protected = False
    vcpu.get_regs()


@needs_kvm
def test_a_moved_in_vcpu_of_the_typed_kind_keeps_its_fpu_ioctls(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    """x86.c refuses REGS, SREGS, SREGS2, DEBUGREGS and XCRS on a protected vCPU of a VM with
    protected state, but FPU and XSAVE only once ``fpstate_is_confidential``: only
    ``__sev_launch_update_vmsa`` (sev.c) sets that, ``sev_migrate_from`` does not, so on a
    MOVE destination's vCPU they still answer."""
    _sev, _vm, vcpu = attached
    vcpu.protected = True  # what a MOVE of an SEV-ES context leaves
    for call in (vcpu.get_regs, vcpu.get_sregs, vcpu.get_debugregs, vcpu.get_xcrs):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    vcpu.get_fpu()
    vcpu.get_xsave()


@needs_kvm
@pytest.mark.parametrize("attached", [VmType.DEFAULT], indirect=True)
def test_protected_vcpu_of_a_legacy_es_vm_answers_without_its_state(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    """On a default-type VM initialised with KVM_SEV_ES_INIT, x86.c has no
    ``has_protected_state``: the register ioctls of a protected vCPU succeed, getters give no
    guest state (the kernel its stale copy, the model zeroes) and setters change nothing."""
    _sev, vm, vcpu = attached
    assert not vm.has_protected_state
    regs = uapi.kvm_regs()
    regs.rip = 0x1234
    vcpu.set_regs(regs)
    vcpu.protected = True
    vcpu.fpu_confidential = True
    assert vcpu.get_regs().rip == 0  # no guest state
    assert bytes(vcpu.get_sregs()) == bytes(uapi.kvm_sregs())
    assert bytes(vcpu.get_debugregs()) == bytes(uapi.kvm_debugregs())
    assert bytes(vcpu.get_fpu()) == bytes(uapi.kvm_fpu())
    other = uapi.kvm_regs()
    other.rip = 0x5678
    vcpu.set_regs(other)  # accepted, and ignored
    vcpu.protected = False
    assert vcpu.get_regs().rip == 0x1234


@needs_kvm
def test_a_dead_vm_fails_every_ioctl_with_eio(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    sev, vm, vcpu = attached
    vm.get_clock()
    sev.dead = True
    with pytest.raises(KvmError) as info:
        vm.get_clock()
    assert info.value.errno == errno.EIO and "moved" in str(info.value)
    with pytest.raises(KvmError) as info:
        vcpu.run()
    assert info.value.errno == errno.EIO
    assert sev.calls == []  # refused before the model is asked
    sev.dead = False
    with pytest.raises(KvmError):  # dead is final
        vcpu.get_regs()


@needs_kvm
def test_run_holds_the_model_vcpu_and_moves_a_protected_state(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    sev, _vm, vcpu = attached
    vcpu.kvm_run.immediate_exit = 1  # KVM_RUN returns at once (EINTR)
    assert isinstance(vcpu.run(), Interrupted)
    assert sev.calls == [("enter", 0), ("exit", 0, None)]  # unprotected: no state moves

    held = vcpu.capture_vmsa()
    assert len(held) == VMSA_SIZE
    size = ctypes.sizeof(uapi.kvm_regs)
    regs = uapi.kvm_regs.from_bytes(held[:size])
    assert regs.rax != 0x1234
    regs.rax = 0x1234
    vcpu.protected = True
    sev.vmsa, sev.calls = bytes(regs) + held[size:], []  # the platform's state differs
    assert isinstance(vcpu.run(), Interrupted)
    assert [c[:2] for c in sev.calls] == [("enter", 0), ("exit", 0)]
    saved = sev.calls[1][2]
    assert saved is not None and uapi.kvm_regs.from_bytes(saved[:size]).rax == 0x1234


@needs_kvm
def test_vcpu_enter_fails_as_kvm_run(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    sev, _vm, vcpu = attached
    sev.enter_error = SevError("KVM_RUN (vcpu_enter)", errno.EINVAL, detail="cannot run")
    with pytest.raises(KvmError) as info:
        vcpu.run()
    assert (info.value.errno, info.value.ioctl) == (errno.EINVAL, "KVM_RUN")
    assert sev.calls == [("enter", 0)]  # not entered: nothing to exit


@needs_kvm
def test_the_vmm_state_export_never_issues_what_a_typed_vm_refuses(
    attached: tuple[StandInSevVm, AttachedVm, AttachedVcpu],
) -> None:
    """x86.c refuses REGS, SREGS(2), DEBUGREGS, XCRS and (FPU confidential) XSAVE on a
    protected vCPU of an SEV-ES-type VM: the VMM's vCPU export leaves them out and its import
    does not set what was left out, so neither fails there."""
    from intrahost.kvm.features import probe_features
    from intrahost.vmm.kvm_state import VcpuComponent

    _sev, vm, vcpu = attached
    assert vm.kvm is not None
    features = probe_features(vm.kvm, vcpu)
    vcpu.protected = True
    vcpu.fpu_confidential = True
    component = VcpuComponent(vcpu, 0, features, b"", protected=lambda: True)
    state = component.save()
    assert (state.regs, state.sregs, state.xsave, state.xcrs, state.debugregs) == (None,) * 5
    component.restore(state)
