"""The model of what KVM's SEV code does since Linux 6.10: VM types and KVM_SEV_INIT2, protected
register state, the GHCB version, SEV-SNP. Each test names the kernel source it follows
(``arch/x86/kvm/svm/sev.c``, ``svm.c``, ``arch/x86/kvm/x86.c`` of torvalds/linux).
"""

from __future__ import annotations

import errno

import pytest
from sev_modelkit import ME, copy, kerr, make_model, move, op, sev_vm, task, vm_with_vcpus

from intrahost.sev.interface import (
    SEV_NR_MAX,
    SVM_SEV_FEAT_DEBUG_SWAP,
    SVM_SEV_FEAT_SNP_ACTIVE,
    SevCommand,
    VmType,
)
from intrahost.sevmodel.kvm_sev import KvmModel, StructKvm, sev_snp_guest


def typed(kvm: KvmModel, vm_type: VmType, vcpus: int = 0, **init: int) -> StructKvm:
    """A VM of ``vm_type`` initialised with KVM_SEV_INIT2, then ``vcpus`` vCPUs."""
    vm = kvm.create_vm(ME, vm_type)
    op(kvm, vm, SevCommand.INIT2, dict(init))
    for i in range(vcpus):
        kvm.create_vcpu(task(), ME, vm, i)
    return vm


def ghcb_sev_info(max_version: int, cbit: int = 51) -> int:
    """GHCB_MSR_SEV_INFO(max, GHCB_VERSION_MIN = 1, cbit)."""
    return (max_version << 48) | (1 << 32) | (cbit << 24) | 1


# ------------------------------------------------------------------------------------------
# VM types and which MOVE works


def test_has_protected_state_follows_the_vm_type(kvm: KvmModel) -> None:
    """svm.c ``svm_vm_init``: ``has_protected_state`` for KVM_X86_SEV_ES_VM and KVM_X86_SNP_VM,
    ``need_init`` for every SEV type."""
    expected = {
        VmType.DEFAULT: (False, False),
        VmType.SEV: (False, True),
        VmType.SEV_ES: (True, True),
        VmType.SNP: (True, True),
    }
    for vm_type, (protected_state, need_init) in expected.items():
        vm = kvm.create_vm(ME, vm_type)
        assert (vm.has_protected_state, vm.sev.need_init) == (protected_state, need_init)


@pytest.mark.parametrize(
    ("src_type", "dst_type"), [(VmType.DEFAULT, VmType.SEV_ES), (VmType.SEV_ES, VmType.DEFAULT)]
)
def test_move_between_a_legacy_and_a_typed_vm_is_einval(
    kvm: KvmModel, src_type: VmType, dst_type: VmType
) -> None:
    """sev.c ``sev_vm_move_enc_context_from``: ``kvm->arch.vm_type !=
    source_kvm->arch.vm_type`` is part of the one EINVAL check, both ways round."""
    src = sev_vm(kvm, es=True) if src_type == VmType.DEFAULT else typed(kvm, VmType.SEV_ES, vcpus=4)
    if src_type != VmType.DEFAULT:
        op(kvm, src, SevCommand.LAUNCH_START, {"policy": 1 << 2})
        op(kvm, src, SevCommand.LAUNCH_UPDATE_VMSA, {"vmsas": [b"v"] * 4})
    dst = vm_with_vcpus(kvm, 4, dst_type)
    err = kerr(lambda: move(kvm, dst, src))
    assert err.errno == errno.EINVAL and "VM types differ" in err.detail
    assert not src.dead and src.sev.active


def test_a_typed_destination_cannot_run_after_the_move(kvm: KvmModel) -> None:
    """sev.c ``sev_migrate_from`` does not move ``need_init``; svm.c ``svm_vcpu_pre_run``
    refuses KVM_RUN (EINVAL) while it is set, and INIT2 cannot clear it on a VM that is
    already an SEV guest (``__sev_guest_init``: ``sev->active``). A legacy-initialised
    default-type destination runs. This is why the VMM uses KVM_SEV_INIT / KVM_SEV_ES_INIT."""
    src = typed(kvm, VmType.SEV, vcpus=1)
    dst = vm_with_vcpus(kvm, 1, VmType.SEV)
    move(kvm, dst, src)
    assert dst.sev.active and dst.sev.need_init
    err = kerr(lambda: kvm.vcpu_enter(task(), ME, dst, 0, "thread"))
    assert err.errno == errno.EINVAL and "never initialised" in err.detail
    assert kerr(lambda: op(kvm, dst, SevCommand.INIT2, {})).errno == errno.EINVAL

    legacy_src = sev_vm(kvm, vcpus=1)
    legacy_dst = vm_with_vcpus(kvm, 1)
    move(kvm, legacy_dst, legacy_src)
    assert kvm.vcpu_enter(task(), ME, legacy_dst, 0, "thread") is None
    kvm.vcpu_exit(legacy_dst, 0, "thread", None)


# ------------------------------------------------------------------------------------------
# protected state


def test_only_launch_update_vmsa_makes_the_fpu_confidential(kvm: KvmModel) -> None:
    """sev.c ``__sev_launch_update_vmsa`` calls ``fpstate_set_confidential`` and sets
    ``guest_state_protected``; ``sev_migrate_from`` sets only ``guest_state_protected`` on the
    destination. (x86.c keys the FPU/XSAVE refusals on the former, REGS/SREGS/DEBUGREGS/XCRS
    on the latter.)"""
    src = sev_vm(kvm, es=True, vcpus=2)
    assert all(v.guest_state_protected and v.fpu_confidential for v in src.vcpus)
    dst = vm_with_vcpus(kvm, 2)
    move(kvm, dst, src)
    assert all(v.guest_state_protected and not v.fpu_confidential for v in dst.vcpus)
    info = kvm.inspect(dst)
    assert info["vcpus"][0]["protected"] and not info["vcpus"][0]["fpu_confidential"]


# ------------------------------------------------------------------------------------------
# the GHCB version


def test_ghcb_version_of_the_initialisations(kvm: KvmModel) -> None:
    """sev.c ``sev_guest_init`` (KVM_SEV_ES_INIT: GHCB_VERSION_MIN) and ``__sev_guest_init``
    (INIT2: the given version, 0 meaning GHCB_VERSION_DEFAULT); ``sev_es_vcpu_reset`` puts it
    in each new vCPU's GHCB MSR."""
    legacy = sev_vm(kvm, es=True, vcpus=1, launch=False)
    assert legacy.sev.ghcb_version == 1
    assert legacy.vcpus[0].sev_es is not None
    assert legacy.vcpus[0].sev_es.ghcb_gpa == ghcb_sev_info(1)
    for asked, got in ((0, 2), (1, 1), (2, 2)):
        vm = typed(kvm, VmType.SEV_ES, vcpus=1, ghcb_version=asked)
        assert vm.sev.ghcb_version == got
        assert vm.vcpus[0].sev_es is not None
        assert vm.vcpus[0].sev_es.ghcb_gpa == ghcb_sev_info(got) == kvm.ghcb_sev_info(vm)


def test_ghcb_version_is_zero_on_mirrors_and_move_destinations(kvm: KvmModel) -> None:
    """sev.c: ``sev_vm_copy_enc_context_from`` and ``sev_migrate_from`` do not copy
    ``ghcb_version``, and ``sev_es_vcpu_reset`` / the GHCB MSR protocol's SEV_INFO answer use
    the VM's value as it is: a vCPU created on a mirror or on a MOVE destination offers GHCB
    versions 1..0. (The model used to fall back to the maximum, 2.)"""
    owner = sev_vm(kvm, es=True, vcpus=1)
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    kvm.create_vcpu(task(), ME, mirror, 0)
    assert mirror.sev.ghcb_version == 0
    assert mirror.vcpus[0].sev_es is not None
    assert mirror.vcpus[0].sev_es.ghcb_gpa == ghcb_sev_info(0)

    dst = vm_with_vcpus(kvm, 1)
    move(kvm, dst, owner)
    # The moved vCPU keeps the GHCB MSR it had (its sev_es state moved with it) ...
    assert dst.vcpus[0].sev_es is not None
    assert dst.vcpus[0].sev_es.ghcb_gpa == ghcb_sev_info(1)
    # ... but the VM's version did not move.
    assert dst.sev.ghcb_version == 0 and kvm.ghcb_sev_info(dst) == ghcb_sev_info(0)
    kvm.create_vcpu(task(), ME, dst, 1)
    assert dst.vcpus[1].sev_es is not None
    assert dst.vcpus[1].sev_es.ghcb_gpa == ghcb_sev_info(0)


# ------------------------------------------------------------------------------------------
# SEV-SNP


def test_snp_init2_makes_an_snp_guest(kvm: KvmModel) -> None:
    """sev.c ``__sev_guest_init``: an SNP VM is SEV-ES, gets SVM_SEV_FEAT_SNP_ACTIVE added to
    its VMSA features (userspace may not ask for it: it is not a supported feature) and an
    SEV-ES ASID; svm.h ``sev_snp_guest``."""
    bad = kvm.create_vm(ME, VmType.SNP)
    err = kerr(lambda: op(kvm, bad, SevCommand.INIT2, {"vmsa_features": SVM_SEV_FEAT_SNP_ACTIVE}))
    assert err.errno == errno.EINVAL
    vm = typed(kvm, VmType.SNP, vmsa_features=SVM_SEV_FEAT_DEBUG_SWAP)
    assert sev_snp_guest(vm) and vm.sev.es_active
    assert vm.sev.vmsa_features == SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SNP_ACTIVE
    assert vm.sev.asid < kvm.config.min_sev_asid
    assert kvm.inspect(vm)["sev"]["snp"]


def test_snp_guests_refuse_the_legacy_commands_with_eperm(kvm: KvmModel) -> None:
    """sev.c ``sev_mem_enc_ioctl``: once INIT2 made the VM an SNP guest, every id below
    KVM_SEV_SNP_LAUNCH_START is EPERM, before the id is looked at (so also INIT2 itself and
    ids that name no command); before INIT2 the SNP VM is not an SNP guest yet."""
    vm = kvm.create_vm(ME, VmType.SNP)
    assert kerr(lambda: op(kvm, vm, SevCommand.INIT)).errno == errno.EINVAL  # typed VM
    op(kvm, vm, SevCommand.INIT2, {})
    for cmd in (*range(SevCommand.INIT, SevCommand.INIT2 + 1), 23, 99):
        err = kerr(lambda cmd=cmd: op(kvm, vm, cmd, {}))  # type: ignore[misc]
        assert err.errno == errno.EPERM and "SNP" in err.detail, cmd
    # The SNP commands get past the gate (the model has no SNP launch).
    err = kerr(lambda: op(kvm, vm, SevCommand.SNP_LAUNCH_START, {}))
    assert err.errno == errno.EOPNOTSUPP


def test_snp_commands_on_guests_that_are_not_snp(kvm: KvmModel) -> None:
    """sev.c: ``snp_launch_start``/``snp_launch_finish`` ENOTTY, ``snp_launch_update`` EINVAL,
    ``snp_enable_certs`` EINVAL on an SEV or SEV-ES guest."""
    es = sev_vm(kvm, es=True, vcpus=0, launch=False)
    expected = {
        SevCommand.SNP_LAUNCH_START: errno.ENOTTY,
        SevCommand.SNP_LAUNCH_UPDATE: errno.EINVAL,
        SevCommand.SNP_LAUNCH_FINISH: errno.ENOTTY,
        SevCommand.SNP_ENABLE_REQ_CERTS: errno.EINVAL,
    }
    for cmd, err in expected.items():
        assert kerr(lambda cmd=cmd: op(kvm, es, cmd, {})).errno == err, cmd  # type: ignore[misc]


def test_snp_enable_req_certs(kvm: KvmModel) -> None:
    """sev.c ``snp_enable_certs`` (KVM_SEV_SNP_ENABLE_REQ_CERTS, Linux 6.20): an SNP guest
    with no vCPU created yet, else EINVAL."""
    vm = typed(kvm, VmType.SNP)
    op(kvm, vm, SevCommand.SNP_ENABLE_REQ_CERTS)
    assert vm.sev.snp_certs_enabled
    late = typed(kvm, VmType.SNP, vcpus=1)
    assert kerr(lambda: op(kvm, late, SevCommand.SNP_ENABLE_REQ_CERTS)).errno == errno.EINVAL


def test_the_command_bound_is_the_platforms() -> None:
    """uapi ``enum sev_cmd_id``: KVM_SEV_NR_MAX is 104 with KVM_SEV_SNP_ENABLE_REQ_CERTS (103)
    and 103 before it, where id 103 is an unknown command (EINVAL from the ``default`` case
    of ``sev_mem_enc_ioctl``, after the SNP gate)."""
    new, _ = make_model()
    old, _ = make_model(sev_nr_max=103)
    for model in (new, old):
        vm = typed(model, VmType.SNP)
        err = kerr(lambda model=model, vm=vm: op(model, vm, 104))  # type: ignore[misc]
        assert err.errno == errno.EINVAL and "unknown" in err.detail
    vm = typed(old, VmType.SNP)
    err = kerr(lambda: op(old, vm, SevCommand.SNP_ENABLE_REQ_CERTS))
    assert err.errno == errno.EINVAL and "unknown" in err.detail


def test_snp_sources_are_refused_by_move_and_copy(kvm: KvmModel) -> None:
    """sev.c ``sev_vm_move_enc_context_from`` and ``sev_vm_copy_enc_context_from``: an SNP
    source is EINVAL in the one combined check ("KVM: SEV: Do not allow intra-host
    migration/mirroring of SNP VMs", in stable 6.12.97, 6.18.40, 7.1.5), even into a VM of
    the SNP type; nothing is moved and the source lives on."""
    src = typed(kvm, VmType.SNP, vcpus=2)
    dst = vm_with_vcpus(kvm, 2, VmType.SNP)
    err = kerr(lambda: move(kvm, dst, src))
    assert err.errno == errno.EINVAL and "SNP" in err.detail
    assert not src.dead and src.sev.active and not dst.sev.active
    mirror = kvm.create_vm(ME, VmType.SNP)
    err = kerr(lambda: copy(kvm, mirror, src))
    assert err.errno == errno.EINVAL and "SNP" in err.detail
    assert not mirror.sev.active and src.sev.mirror_vms == []
    # The flags were released: an SEV move still works.
    plain_src, plain_dst = sev_vm(kvm), vm_with_vcpus(kvm, 0)
    move(kvm, plain_dst, plain_src)


def test_snp_vm_type_follows_the_platform() -> None:
    """svm/sev.c ``sev_set_cpu_caps``: KVM_X86_SNP_VM is a supported VM type only with SNP
    (which needs SEV-ES)."""
    with_snp, _ = make_model()
    assert VmType.SNP in with_snp.supported_vm_types()
    for config in ({"sev_snp_enabled": False}, {"sev_es_enabled": False}):
        model, _ = make_model(**config)
        assert VmType.SNP not in model.supported_vm_types()
        assert kerr(lambda model=model: model.create_vm(ME, VmType.SNP)).errno == errno.EINVAL  # type: ignore[misc]


def test_uapi_numbers_newer_than_the_installed_headers() -> None:
    """Mirrored by hand from ``arch/x86/include/uapi/asm/kvm.h`` (the installed headers are
    older): ``KVM_X86_SW_PROTECTED_VM`` 1, ``KVM_X86_SNP_VM`` 4, ``enum sev_cmd_id``'s
    ``KVM_SEV_INIT2`` 22, ``KVM_SEV_SNP_LAUNCH_START`` 100 .. ``KVM_SEV_SNP_ENABLE_REQ_CERTS``
    103 and ``KVM_SEV_NR_MAX`` after it; ``SVM_SEV_FEAT_SNP_ACTIVE`` is bit 0 of the VMSA
    features (``arch/x86/include/asm/svm.h``)."""
    assert (VmType.SW_PROTECTED, VmType.SNP) == (1, 4)
    assert SevCommand.INIT2 == 22
    assert [int(c) for c in SevCommand if c >= 100] == [100, 101, 102, 103]
    assert SEV_NR_MAX == SevCommand.SNP_ENABLE_REQ_CERTS + 1 == 104
    assert SVM_SEV_FEAT_SNP_ACTIVE == 1
