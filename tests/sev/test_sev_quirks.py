"""Kernel quirks the model follows on purpose (behaviour of sev.c no selftest covers), one
test each.

Each is named by a ``QUIRK`` comment at the place in ``intrahost/sevmodel/kvm_sev.py`` where
the model follows the kernel.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

from sev_modelkit import (
    ME,
    copy,
    kerr,
    make_model,
    move,
    op,
    sev_vm,
    task,
    vm_with_vcpus,
)
from sev_testlib import CHILD, expect

from intrahost.sev import GuestState, SevCommand, VmType
from intrahost.sevmodel.client import ModelPlatform
from intrahost.sevmodel.kvm_sev import KvmModel


def test_quirk_sev_fd_is_not_moved(model: ModelPlatform) -> None:
    """Spec 4.6: the /dev/sev fd number recorded at LAUNCH_START stays with the source.

    Commands on the destination that go through it (LAUNCH_*, GUEST_STATUS, DBG_*) look up
    fd 0 of the caller: EBADF, unless fd 0 happens to be /dev/sev (then they work).
    """
    src = model.create_vm()
    src.sev_init()
    src.launch_start(0)
    dst = model.create_vm()
    dst.move_enc_context_from(src.fd)
    assert dst.inspect()["sev"]["fd"] == 0
    err = expect(dst.guest_status, errno.EBADF)
    assert "does not carry it" in err.detail
    expect(dst.launch_finish, errno.EBADF)
    # The same VM from a process whose fd 0 is a model /dev/sev.
    proc = subprocess.run(
        [sys.executable, CHILD, "sev-fd-quirk", model.socket_path],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    seen = json.loads(proc.stdout)
    assert seen["before"] == errno.EBADF
    assert seen["after_state"] == GuestState.LUPDATE.name and seen["handle"] > 0
    src.close()
    dst.close()


def test_quirk_guest_status_before_launch_start_resolves_fd_0(kvm: KvmModel) -> None:
    """Same mechanism: before LAUNCH_START the recorded fd is 0."""
    vm = sev_vm(kvm, launch=False)
    assert kerr(lambda: op(kvm, vm, SevCommand.GUEST_STATUS, {})).errno == errno.EBADF


def test_quirk_typed_destination_keeps_need_init() -> None:
    """Spec 4.6: need_init is not moved, so a KVM_X86_SEV(_ES)_VM destination never runs."""
    kvm, _ = make_model()
    src = kvm.create_vm(ME, VmType.SEV_ES)
    op(kvm, src, SevCommand.INIT2, {})
    kvm.create_vcpu(task(), ME, src, 0)
    op(kvm, src, SevCommand.LAUNCH_START, {"policy": 4})
    op(kvm, src, SevCommand.LAUNCH_UPDATE_VMSA)
    dst = vm_with_vcpus(kvm, 1, VmType.SEV_ES)
    move(kvm, dst, src)
    assert dst.sev.active and dst.sev.need_init
    err = kerr(lambda: kvm.vcpu_enter(task(), ME, dst, 0, "h"))
    assert err.errno == errno.EINVAL and "never initialised" in err.detail
    # Default-type VMs (KVM_SEV_INIT / KVM_SEV_ES_INIT) do not have the problem.
    src2 = sev_vm(kvm, es=True, vcpus=1)
    dst2 = vm_with_vcpus(kvm, 1)
    move(kvm, dst2, src2)
    assert kvm.vcpu_enter(task(), ME, dst2, 0, "h") == b"v0"


def test_quirk_regions_keep_source_process_addresses(kvm: KvmModel) -> None:
    """Spec 4.1: enc_region.uaddr is an address in the process that registered it."""
    old_vmm, new_vmm = ME, type(ME)(pid=2000)
    src = sev_vm(kvm)
    kvm.sev_mem_enc_register_region(task(), old_vmm, src, 0x7F0000000000, 0x2000)
    dst = vm_with_vcpus(kvm, 0, caller=new_vmm)
    move(kvm, dst, src, caller=new_vmm)
    assert [(r.uaddr, r.size) for r in dst.sev.regions] == [(0x7F0000000000, 0x2000)]
    assert dst.sev.pages_locked == 2
    # The new VMM unregisters by the old VMM's numbers: matched by value, nothing else.
    kvm.sev_mem_enc_unregister_region(task(), new_vmm, dst, 0x7F0000000000, 0x2000)
    assert dst.sev.pages_locked == 0


def test_quirk_vcpus_paired_by_index_not_id(kvm: KvmModel) -> None:
    """Spec 2.4: vcpu_id equality is not checked."""
    src = sev_vm(kvm, es=True, vcpus=2)
    dst = kvm.create_vm(ME, VmType.DEFAULT)
    kvm.create_vcpu(task(), ME, dst, 7)
    kvm.create_vcpu(task(), ME, dst, 3)
    move(kvm, dst, src)
    assert [(v.vcpu_id, v.sev_es.vmsa if v.sev_es else None) for v in dst.vcpus] == [
        (7, b"v0"),
        (3, b"v1"),
    ]


def test_quirk_sev_es_move_across_cgroups_uses_the_sev_counter() -> None:
    """Spec 4.3: the charge type comes from es_active at call time."""
    kvm, _ = make_model()
    src = sev_vm(kvm, es=True, t=task(cgroup="/old"))
    assert kvm.misc.usage[("/old", "sev_es")] == 1
    dst = vm_with_vcpus(kvm, 4)
    move(kvm, dst, src, t=task(cgroup="/new"))
    # Destination charged as SEV (its es_active was still false), source "uncharged" as SEV
    # (its es_active was already cleared): the SEV-ES charge of /old stays behind.
    assert kvm.misc.usage[("/new", "sev")] == 1
    assert kvm.misc.usage[("/old", "sev")] == -1
    assert kvm.misc.usage[("/old", "sev_es")] == 1
    assert any("sev became less than 0 in /old" in w for w in kvm.misc.warnings)
    kvm.kvm_put_kvm(dst)  # sev_asid_free uncharges SEV-ES from /new
    assert kvm.misc.usage[("/new", "sev_es")] == -1
    # Within one cgroup (what the selftests do) nothing is charged at all.
    kvm2, _ = make_model()
    src2 = sev_vm(kvm2, es=True)
    move(kvm2, vm_with_vcpus(kvm2, 4), src2)
    assert kvm2.misc.usage.get(("/", "sev"), 0) == 0
    assert kvm2.misc.usage[("/", "sev_es")] == 1


def test_quirk_moving_a_fresh_mirror_leaks_a_charge() -> None:
    """Found while modelling (no selftest covers it): a mirror's misc_cg is NULL.

    MOVE compares the caller's cgroup with the source's NULL one, charges the destination,
    and on success uncharges the NULL cgroup (a no-op). Every move of a freshly copied mirror
    leaks one SEV charge; with enough of them INIT fails with EBUSY though ASIDs are free.
    """
    kvm, _ = make_model(max_sev_asid=101, min_sev_asid=100)  # 2 SEV ASIDs
    owner = sev_vm(kvm)
    assert kvm.misc.usage[("/", "sev")] == 1
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    dst_mirror = vm_with_vcpus(kvm, 0)
    move(kvm, dst_mirror, mirror)
    assert kvm.misc.usage[("/", "sev")] == 2
    # A second move of the (now charged) mirror charges nothing more.
    move(kvm, vm_with_vcpus(kvm, 0), dst_mirror)
    assert kvm.misc.usage[("/", "sev")] == 2
    # One ASID is free, but the misc capacity is used up.
    vm = kvm.create_vm(ME, VmType.DEFAULT)
    err = kerr(lambda: op(kvm, vm, SevCommand.INIT))
    assert err.errno == errno.EBUSY and "misc cgroup" in err.detail


def test_quirk_second_launch_update_vmsa_is_measured_again(kvm: KvmModel) -> None:
    """Nothing checks guest_state_protected: the current selftest issues it twice."""
    vm = sev_vm(kvm, es=True, vcpus=2)
    op(kvm, vm, SevCommand.LAUNCH_UPDATE_VMSA)
    guest = kvm.fw.guests[vm.sev.handle]
    import hashlib

    assert guest.digest.digest() == hashlib.sha256(b"v0v1v0v1").digest()


def test_quirk_require_update_vmsa_case_fails_on_the_vcpu_count(kvm: KvmModel) -> None:
    """Spec 5.2: the selftest's "require UPDATE_VMSA" case never reaches that check."""
    no_vmsa = kvm.create_vm(ME, VmType.DEFAULT)
    op(kvm, no_vmsa, SevCommand.ES_INIT)
    kvm.create_vcpu(task(), ME, no_vmsa, 1)
    err = kerr(lambda: move(kvm, vm_with_vcpus(kvm, 0), no_vmsa))
    assert err.errno == errno.EINVAL and "has 0 vCPUs, the source 1" in err.detail


def test_quirk_receive_update_data_on_non_sev_is_einval(kvm: KvmModel) -> None:
    """sev_receive_update_data says -EINVAL where every sibling says -ENOTTY."""
    vm = vm_with_vcpus(kvm, 0)
    assert kerr(lambda: op(kvm, vm, SevCommand.RECEIVE_UPDATE_DATA, {})).errno == errno.EINVAL
    assert kerr(lambda: op(kvm, vm, SevCommand.RECEIVE_START, {})).errno == errno.ENOTTY
