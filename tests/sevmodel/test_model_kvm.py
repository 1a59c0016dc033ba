"""The model of KVM's sev.c, driven directly (no service): every check in the kernel's order.

Section headings name the kernel functions followed (``arch/x86/kvm/svm/sev.c`` unless said
otherwise).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sev_modelkit import (
    ME,
    SEV_FD,
    FakeCaller,
    copy,
    kerr,
    make_model,
    move,
    op,
    sev_vm,
    task,
    vm_with_vcpus,
)
from support import PATIENCE

from intrahost.sev.interface import SEV_NR_MAX, SEV_POLICY_ES, FirmwareError, SevCommand, VmType
from intrahost.sevmodel.kvm_sev import INVALID_PAGE, IoctlFailure, KvmModel, StructKvm
from intrahost.sevmodel.sync import Task

# ------------------------------------------------------------------------------------------
# MOVE: each check, in order (sev_vm_move_enc_context_from)


def test_move_dead_destination_is_eio_before_anything(kvm: KvmModel) -> None:
    a, b = sev_vm(kvm), vm_with_vcpus(kvm, 4)
    move(kvm, b, a)
    # The destination gate (kvm_vm_ioctl) comes before the fd lookup: EIO, not EBADF.
    assert kerr(lambda: move(kvm, a, None)).errno == errno.EIO
    assert kerr(lambda: move(kvm, a, b)).errno == errno.EIO


def test_move_destination_of_another_process_is_eio(kvm: KvmModel) -> None:
    src = sev_vm(kvm)
    dst = vm_with_vcpus(kvm, 0)
    other = FakeCaller(pid=2000)
    err = kerr(lambda: move(kvm, dst, src, caller=other))
    assert err.errno == errno.EIO and "created by process 1000" in err.detail


def test_move_source_of_another_process_is_fine(kvm: KvmModel) -> None:
    other = FakeCaller(pid=2000)
    src = sev_vm(kvm, caller=other)
    dst = vm_with_vcpus(kvm, 0)
    move(kvm, dst, src)  # the source fd is only fdget'd: no mm check
    assert dst.sev.active and src.dead


def test_move_bad_source_fd_is_ebadf(kvm: KvmModel) -> None:
    dst = vm_with_vcpus(kvm, 0)
    assert kerr(lambda: move(kvm, dst, None)).errno == errno.EBADF


def test_move_to_self_is_einval_and_touches_no_flag(kvm: KvmModel) -> None:
    a = sev_vm(kvm)
    assert kerr(lambda: move(kvm, a, a)).errno == errno.EINVAL
    assert not a.sev.migration_in_progress and not a.lock.locked


def test_move_busy_flags(kvm: KvmModel) -> None:
    src, dst = sev_vm(kvm), vm_with_vcpus(kvm, 4)
    dst.sev.migration_in_progress = True
    assert kerr(lambda: move(kvm, dst, src)).errno == errno.EBUSY
    assert not src.sev.migration_in_progress
    dst.sev.migration_in_progress = False
    src.sev.migration_in_progress = True
    assert kerr(lambda: move(kvm, dst, src)).errno == errno.EBUSY
    # The destination's flag, taken first, is given back.
    assert not dst.sev.migration_in_progress


def test_move_busy_flag_precedes_the_sev_checks(kvm: KvmModel) -> None:
    plain, dst = vm_with_vcpus(kvm, 1), vm_with_vcpus(kvm, 0)
    plain.sev.migration_in_progress = True
    assert kerr(lambda: move(kvm, dst, plain)).errno == errno.EBUSY


@pytest.mark.parametrize(
    "case",
    ["type mismatch", "destination SEV", "destination SEV-ES", "source not SEV", "source dead"],
)
def test_move_einval_sev_checks(kvm: KvmModel, case: str) -> None:
    if case == "type mismatch":
        src = kvm.create_vm(ME, VmType.SEV)
        op(kvm, src, SevCommand.INIT2, {})
        dst = kvm.create_vm(ME, VmType.DEFAULT)
    elif case == "destination SEV":
        src, dst = sev_vm(kvm), sev_vm(kvm)
    elif case == "destination SEV-ES":
        src, dst = sev_vm(kvm), sev_vm(kvm, es=True)
    elif case == "source not SEV":
        src, dst = vm_with_vcpus(kvm, 4), vm_with_vcpus(kvm, 0)
    else:
        src, mid = sev_vm(kvm), vm_with_vcpus(kvm, 0)
        move(kvm, mid, src)
        dst = vm_with_vcpus(kvm, 0)
    err = kerr(lambda: move(kvm, dst, src))
    assert err.errno == errno.EINVAL
    assert not dst.lock.locked and not src.lock.locked
    assert not dst.sev.migration_in_progress and not src.sev.migration_in_progress


def test_move_cgroup_charge_failure_is_ebusy_and_after_the_sev_checks() -> None:
    kvm, _ = make_model(misc_max={"/full": {"sev": 0}})
    src = sev_vm(kvm)
    dst = vm_with_vcpus(kvm, 0)
    err = kerr(lambda: move(kvm, dst, src, t=task(cgroup="/full")))
    assert err.errno == errno.EBUSY and "misc cgroup" in err.detail
    assert dst.sev.misc_cg is None and not dst.sev.migration_in_progress
    # The SEV checks come first: a destination that is already SEV is EINVAL.
    dst2 = sev_vm(kvm)
    assert kerr(lambda: move(kvm, dst2, src, t=task(cgroup="/full"))).errno == errno.EINVAL


def test_move_vcpu_creation_in_flight_is_ebusy(kvm: KvmModel) -> None:
    src = sev_vm(kvm, es=True)
    dst = vm_with_vcpus(kvm, 3)
    dst.hold_vcpu_creation = True
    creator = threading.Thread(target=kvm.create_vcpu, args=(task(), ME, dst, 3))
    creator.start()
    try:
        with kvm.cond:
            assert kvm.cond.wait_for(lambda: dst.created_vcpus == 4, timeout=PATIENCE)
        # 4 created, 3 online: EBUSY, before the SEV-ES vCPU count is compared.
        err = kerr(lambda: move(kvm, dst, src))
        assert err.errno == errno.EBUSY and "being created" in err.detail
    finally:
        with kvm.cond:
            dst.hold_vcpu_creation = False
            kvm.cond.notify_all()
        creator.join()
    move(kvm, dst, src)


def test_move_sev_es_vcpu_count_must_match(kvm: KvmModel) -> None:
    src = sev_vm(kvm, es=True)
    for n in (0, 3, 5):
        dst = vm_with_vcpus(kvm, n)
        err = kerr(lambda dst=dst: move(kvm, dst, src))  # type: ignore[misc]
        assert err.errno == errno.EINVAL and "vCPUs" in err.detail


def test_move_sev_es_source_vcpus_must_be_launched(kvm: KvmModel) -> None:
    src = sev_vm(kvm, es=True, launch=False)
    op(kvm, src, SevCommand.LAUNCH_START, {"policy": SEV_POLICY_ES})
    err = kerr(lambda: move(kvm, vm_with_vcpus(kvm, 4), src))
    assert err.errno == errno.EINVAL and "LAUNCH_UPDATE_VMSA" in err.detail


def test_move_plain_sev_any_destination_vcpu_count(kvm: KvmModel) -> None:
    for n in (0, 1, 4, 7):
        src = sev_vm(kvm)
        dst = vm_with_vcpus(kvm, n)
        move(kvm, dst, src)
        assert dst.sev.active


def test_move_transfers_the_context(kvm: KvmModel) -> None:
    kvm_, dead = make_model()
    src = sev_vm(kvm_, es=True)
    kvm_.sev_mem_enc_register_region(task(), ME, src, 0x10000, 0x3000)
    before = {k: getattr(src.sev, k) for k in ("asid", "handle", "pages_locked", "policy")}
    records = [v.sev_es for v in src.vcpus]
    dst = vm_with_vcpus(kvm_, 4)
    move(kvm_, dst, src)
    assert dst.sev.active and dst.sev.es_active
    assert (dst.sev.asid, dst.sev.handle, dst.sev.pages_locked) == (
        before["asid"],
        before["handle"],
        3,
    )
    assert [(r.uaddr, r.size) for r in dst.sev.regions] == [(0x10000, 0x3000)]
    # Per-vCPU SEV-ES state moved as one record each, paired by index.
    for i, vcpu in enumerate(dst.vcpus):
        assert vcpu.guest_state_protected
        assert vcpu.sev_es is not None and records[i] is not None
        assert vcpu.sev_es.vmsa == records[i].vmsa == b"v%d" % i
        assert vcpu.sev_es.ghcb_gpa == records[i].ghcb_gpa
    # The source: zeroed, not SEV, dead.
    assert not src.sev.active and not src.sev.es_active
    assert (src.sev.asid, src.sev.handle, src.sev.pages_locked) == (0, 0, 0)
    assert src.sev.regions == [] and src.dead and dead == [src]
    for vcpu in src.vcpus:
        assert vcpu.sev_es is None and not vcpu.guest_state_protected
    # No firmware command ran: same guest, same state, same ASID binding.
    guest = kvm_.fw.guests[before["handle"]]
    assert guest.asid == before["asid"] and guest.state.name == "LUPDATE"
    # Locks and flags released.
    for vm in (src, dst):
        assert not vm.lock.locked and not vm.sev.migration_in_progress
        assert all(not v.mutex.locked for v in vm.vcpus)


def test_dead_source_every_later_operation_is_eio(kvm: KvmModel) -> None:
    src = sev_vm(kvm, es=True)
    move(kvm, vm_with_vcpus(kvm, 4), src)
    other = sev_vm(kvm)
    calls: list[Callable[[], object]] = [
        lambda: kvm.create_vcpu(task(), ME, src, 9),
        lambda: op(kvm, src, SevCommand.GUEST_STATUS, {}),
        lambda: op(kvm, src, SevCommand.LAUNCH_FINISH),
        lambda: kvm.sev_mem_enc_register_region(task(), ME, src, 0, 4096),
        lambda: kvm.sev_mem_enc_unregister_region(task(), ME, src, 0, 4096),
        lambda: kvm.vcpu_enter(task(), ME, src, 0, "h"),
        lambda: kvm.vcpu_protected(ME, src, 0),
        lambda: move(kvm, src, other),
        lambda: copy(kvm, src, other),
    ]
    for call in calls:
        assert kerr(call).errno == errno.EIO
    # As a *source* a dead VM is just "not SEV".
    assert kerr(lambda: move(kvm, vm_with_vcpus(kvm, 4), src)).errno == errno.EINVAL


# ------------------------------------------------------------------------------------------
# COPY (sev_vm_copy_enc_context_from)


def test_copy_checks(kvm: KvmModel) -> None:
    owner = sev_vm(kvm)
    assert kerr(lambda: copy(kvm, owner, owner)).errno == errno.EINVAL
    assert kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 0), None)).errno == errno.EBADF
    assert kerr(lambda: copy(kvm, sev_vm(kvm), owner)).errno == errno.EINVAL
    assert kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 0), vm_with_vcpus(kvm, 1))).errno == (
        errno.EINVAL
    )
    err = kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 1), owner))
    assert err.errno == errno.EINVAL and "vCPUs" in err.detail
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    err = kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 0), mirror))
    assert err.errno == errno.EINVAL and "mirror" in err.detail
    owner.sev.migration_in_progress = True
    assert kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 0), owner)).errno == errno.EBUSY


def test_copy_makes_a_mirror_sharing_the_context(kvm: KvmModel) -> None:
    owner = sev_vm(kvm, es=True)
    users = owner.users
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    m, o = mirror.sev, owner.sev
    assert m.active and m.es_active and not m.need_init
    assert (m.asid, m.handle, m.fd) == (o.asid, o.handle, o.fd)
    assert m.enc_context_owner is owner and o.mirror_vms == [mirror]
    assert owner.users == users + 1  # the mirror pins its owner
    assert m.misc_cg is None  # no cgroup charge, no firmware command
    # Mirror vCPUs are created afterwards and get SEV-ES state.
    kvm.create_vcpu(task(), ME, mirror, 0)
    assert mirror.vcpus[0].sev_es is not None


def test_mirror_allowed_commands(kvm: KvmModel) -> None:
    owner = sev_vm(kvm, es=True)
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    allowed = {
        SevCommand.LAUNCH_UPDATE_VMSA,
        SevCommand.GUEST_STATUS,
        SevCommand.DBG_DECRYPT,
        SevCommand.DBG_ENCRYPT,
    }
    for cmd in range(SEV_NR_MAX):
        if cmd in allowed:
            continue
        err = kerr(lambda cmd=cmd: op(kvm, mirror, cmd, None))  # type: ignore[misc]
        assert err.errno == errno.EINVAL and "mirror" in err.detail
    assert op(kvm, mirror, SevCommand.GUEST_STATUS, {})["handle"] == owner.sev.handle
    kvm.create_vcpu(task(), ME, mirror, 0)
    op(kvm, mirror, SevCommand.LAUNCH_UPDATE_VMSA)
    assert mirror.vcpus[0].guest_state_protected


def test_mirror_regions_refused_in_kernel_order(kvm: KvmModel) -> None:
    owner = sev_vm(kvm)
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    assert kerr(lambda: kvm.sev_mem_enc_register_region(task(), ME, mirror, 0, 4096)).errno == (
        errno.EINVAL
    )
    assert kerr(lambda: kvm.sev_mem_enc_unregister_region(task(), ME, mirror, 0, 4096)).errno == (
        errno.EINVAL
    )
    # On a plain VM: REG says ENOTTY, UNREG also ENOTTY (checked under the lock).
    plain = vm_with_vcpus(kvm, 0)
    assert kerr(lambda: kvm.sev_mem_enc_register_region(task(), ME, plain, 0, 1)).errno == (
        errno.ENOTTY
    )
    assert kerr(lambda: kvm.sev_mem_enc_unregister_region(task(), ME, plain, 0, 1)).errno == (
        errno.ENOTTY
    )


def test_mirror_pins_owner_until_the_mirror_goes(kvm: KvmModel) -> None:
    owner = sev_vm(kvm)
    asid = owner.sev.asid
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    kvm.kvm_put_kvm(owner)  # the owner's fd is closed
    assert not owner.destroyed and asid not in kvm.reclaim_asid_bitmap
    kvm.kvm_put_kvm(mirror)
    assert owner.destroyed and mirror.destroyed
    assert asid in kvm.reclaim_asid_bitmap


def test_move_owner_with_mirrors_reparents_them(kvm: KvmModel) -> None:
    owner = sev_vm(kvm)
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    dst = vm_with_vcpus(kvm, 0)
    users_dst = dst.users
    move(kvm, dst, owner)  # allowed since ~5.18 (no -EBUSY for owners with mirrors)
    assert mirror.sev.enc_context_owner is dst and dst.sev.mirror_vms == [mirror]
    assert owner.sev.mirror_vms == [] and dst.users == users_dst + 1


def test_move_mirror_stays_a_mirror(kvm: KvmModel) -> None:
    owner = sev_vm(kvm)
    mirror = vm_with_vcpus(kvm, 0)
    copy(kvm, mirror, owner)
    dst_mirror = vm_with_vcpus(kvm, 0)
    move(kvm, dst_mirror, mirror)
    assert dst_mirror.sev.enc_context_owner is owner
    assert owner.sev.mirror_vms == [dst_mirror]
    assert mirror.dead and mirror.sev.enc_context_owner is None


# ------------------------------------------------------------------------------------------
# locking (sev_lock_two_vms, kvm_lock_all_vcpus in virt/kvm/kvm_main.c)


def _wait_blocked(kvm: KvmModel, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        with kvm.cond:
            if predicate():
                return
        assert time.monotonic() < deadline, "the request never blocked"
        time.sleep(0.001)


def _run_move(
    kvm: KvmModel, dst: StructKvm, src: StructKvm, t: Task
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        try:
            move(kvm, dst, src, t=t)
            out.append(0)
        except IoctlFailure as err:
            out.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def _kill(kvm: KvmModel, t: Task) -> None:
    with kvm.cond:
        t.killed = True
        kvm.cond.notify_all()


def test_killed_while_waiting_for_a_source_vcpu_releases_exactly_what_it_took(
    kvm: KvmModel,
) -> None:
    src = sev_vm(kvm, es=True, vcpus=3)
    dst = vm_with_vcpus(kvm, 3)
    kvm.vcpu_enter(task(), ME, src, 1, "vmm-thread")  # KVM_RUN holds vCPU 1's mutex
    mover = task("mover")
    thread, out = _run_move(kvm, dst, src, mover)
    _wait_blocked(kvm, lambda: src.vcpus[1].mutex.waiters == 1)
    # Now held by the mover: both flags, both kvm->lock, all dst vCPUs, src vCPU 0.
    assert dst.lock.owner is mover and src.lock.owner is mover
    assert [v.mutex.owner for v in dst.vcpus] == [mover] * 3
    assert src.vcpus[0].mutex.owner is mover
    _kill(kvm, mover)
    thread.join(PATIENCE)
    assert isinstance(out[0], IoctlFailure) and out[0].errno == errno.EINTR
    # Everything the mover took is free, and the mutex it failed to take still belongs to
    # the vCPU thread (V8's unlock loop would have released it).
    assert src.vcpus[1].mutex.owner == "vmm-thread"
    assert not src.vcpus[0].mutex.locked and not src.vcpus[2].mutex.locked
    assert all(not v.mutex.locked for v in dst.vcpus)
    assert not dst.lock.locked and not src.lock.locked
    assert not dst.sev.migration_in_progress and not src.sev.migration_in_progress
    kvm.vcpu_exit(src, 1, "vmm-thread", b"state")
    move(kvm, dst, src)
    assert dst.sev.active


@pytest.mark.parametrize("where", ["dst lock", "src lock", "dst vcpu"])
def test_killed_at_each_wait_unwinds(kvm: KvmModel, where: str) -> None:
    src = sev_vm(kvm)
    dst = vm_with_vcpus(kvm, 2)
    blocker = "someone"
    if where == "dst lock":
        dst.lock.lock(task(), killable=False, owner=blocker)
        mutex = dst.lock
    elif where == "src lock":
        src.lock.lock(task(), killable=False, owner=blocker)
        mutex = src.lock
    else:
        dst.vcpus[1].mutex.lock(task(), killable=False, owner=blocker)
        mutex = dst.vcpus[1].mutex
    mover = task("mover")
    thread, out = _run_move(kvm, dst, src, mover)
    _wait_blocked(kvm, lambda: mutex.waiters == 1)
    _kill(kvm, mover)
    thread.join(PATIENCE)
    assert out[0].errno == errno.EINTR
    assert mutex.owner == blocker
    others = [dst.lock, src.lock, *(v.mutex for v in dst.vcpus + src.vcpus)]
    assert all(not m.locked for m in others if m is not mutex)
    assert not dst.sev.migration_in_progress and not src.sev.migration_in_progress
    mutex.unlock(blocker)
    move(kvm, dst, src)


def test_blocked_move_makes_others_ebusy_not_deadlock(kvm: KvmModel) -> None:
    a = sev_vm(kvm, vcpus=1)
    b = vm_with_vcpus(kvm, 1)
    kvm.vcpu_enter(task(), ME, a, 0, "vmm")
    mover = task("mover")
    thread, out = _run_move(kvm, b, a, mover)
    _wait_blocked(kvm, lambda: a.vcpus[0].mutex.waiters == 1)
    # The reverse move (the ABBA case) and any move touching a or b fail fast.
    assert kerr(lambda: move(kvm, a, b)).errno == errno.EBUSY
    assert kerr(lambda: copy(kvm, vm_with_vcpus(kvm, 0), a)).errno == errno.EBUSY
    kvm.vcpu_exit(a, 0, "vmm", None)
    thread.join(PATIENCE)
    assert out == [0]


def test_vcpu_enter_waits_for_a_move_and_then_sees_eio(kvm: KvmModel) -> None:
    src = sev_vm(kvm, vcpus=2)
    dst = vm_with_vcpus(kvm, 1)
    src.vcpus[1].mutex.lock(task(), killable=False, owner="blocker")
    mover = task("mover")
    thread, out = _run_move(kvm, dst, src, mover)
    # The mover holds src vCPU 0 and waits for vCPU 1.
    _wait_blocked(kvm, lambda: src.vcpus[1].mutex.waiters == 1)
    entered: list[Any] = []

    def enter() -> None:
        try:
            entered.append(kvm.vcpu_enter(task(), ME, src, 0, "vmm"))
        except IoctlFailure as err:
            entered.append(err)

    runner = threading.Thread(target=enter)
    runner.start()
    _wait_blocked(kvm, lambda: src.vcpus[0].mutex.waiters == 1)
    src.vcpus[1].mutex.unlock("blocker")
    thread.join(PATIENCE)
    runner.join(PATIENCE)
    assert out == [0]
    assert isinstance(entered[0], IoctlFailure) and entered[0].errno == errno.EIO


def test_non_killable_waits_are_not_interrupted(kvm: KvmModel) -> None:
    vm = vm_with_vcpus(kvm, 0)
    vm.lock.lock(task(), killable=False, owner="holder")
    creator = task("creator")
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(kvm.create_vcpu(creator, ME, vm, 0)))
    thread.start()
    _wait_blocked(kvm, lambda: vm.lock.waiters == 1)
    _kill(kvm, creator)
    with kvm.cond:
        kvm.cond.wait(0.05)
    assert thread.is_alive()  # mutex_lock, not _killable
    vm.lock.unlock("holder")
    thread.join(PATIENCE)
    assert result == [0]


def test_launch_update_vmsa_waits_killably_for_vcpus(kvm: KvmModel) -> None:
    vm = sev_vm(kvm, es=True, launch=False, vcpus=2)
    op(kvm, vm, SevCommand.LAUNCH_START, {"policy": SEV_POLICY_ES})
    vm.vcpus[1].mutex.lock(task(), killable=False, owner="vmm")
    t = task("launcher")
    out: list[Any] = []

    def body() -> None:
        try:
            op(kvm, vm, SevCommand.LAUNCH_UPDATE_VMSA, t=t)
        except IoctlFailure as err:
            out.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    _wait_blocked(kvm, lambda: vm.vcpus[1].mutex.waiters == 1)
    _kill(kvm, t)
    thread.join(PATIENCE)
    assert out[0].errno == errno.EINTR
    assert vm.vcpus[0].guest_state_protected and not vm.vcpus[1].guest_state_protected
    assert not vm.lock.locked


# ------------------------------------------------------------------------------------------
# ASIDs (sev_asid_new, __sev_recycle_asids, sev_asid_free)


def test_asid_ranges_default_epyc() -> None:
    kvm, _ = make_model()
    assert (kvm.config.max_sev_asid, kvm.config.min_sev_asid) == (509, 100)
    assert sev_vm(kvm, launch=False).sev.asid == 100
    assert sev_vm(kvm, es=True, launch=False).sev.asid == 1
    assert kvm.misc.capacity == {"sev": 410, "sev_es": 99}


def test_asid_exhaustion_and_reuse_after_release() -> None:
    kvm, _ = make_model(max_sev_asid=4, min_sev_asid=3)  # ES: 1..2, SEV: 3..4
    a, b = sev_vm(kvm), sev_vm(kvm)
    assert (a.sev.asid, b.sev.asid) == (3, 4)
    c = kvm.create_vm(ME, VmType.DEFAULT)
    err = kerr(lambda: op(kvm, c, SevCommand.INIT))
    # The misc cgroup capacity (= the range size) is charged before the bitmap is searched.
    assert err.errno == errno.EBUSY and "no sev ASID left" in err.detail
    assert not c.sev.active and c.sev.misc_cg is None
    assert kvm.misc.usage[("/", "sev")] == 2
    # ES ASIDs are a separate range.
    assert sev_vm(kvm, es=True).sev.asid == 1
    # Release a: its ASID waits in the reclaim bitmap until the next flush.
    kvm.kvm_put_kvm(a)
    assert 3 in kvm.reclaim_asid_bitmap and 3 in kvm.asid_bitmap
    assert 3 in kvm.fw.asids_to_flush  # DEACTIVATEd, not yet DF_FLUSHed
    op(kvm, c, SevCommand.INIT)  # exhausted -> WBINVD + DF_FLUSH -> recycled
    assert c.sev.asid == 3 and not kvm.reclaim_asid_bitmap and not kvm.fw.asids_to_flush
    op(kvm, c, SevCommand.LAUNCH_START, {"policy": 0})  # ACTIVATE accepts the flushed ASID


def test_freed_asid_is_not_reused_while_others_are_free() -> None:
    kvm, _ = make_model()
    a = sev_vm(kvm)
    kvm.kvm_put_kvm(a)
    assert sev_vm(kvm).sev.asid == 101


def test_no_es_asids_means_no_sev_es() -> None:
    kvm, _ = make_model(min_sev_asid=1)
    vm = kvm.create_vm(ME, VmType.DEFAULT)
    assert kerr(lambda: op(kvm, vm, SevCommand.ES_INIT)).errno == errno.ENOTTY
    assert kerr(lambda: kvm.create_vm(ME, VmType.SEV_ES)).errno == errno.EINVAL


def test_empty_sev_range_is_enotty() -> None:
    kvm, _ = make_model(max_sev_asid=9, min_sev_asid=10)
    vm = kvm.create_vm(ME, VmType.DEFAULT)
    assert kerr(lambda: op(kvm, vm, SevCommand.INIT)).errno == errno.ENOTTY
    op(kvm, vm, SevCommand.ES_INIT)
    assert vm.sev.asid == 1


def test_moved_asid_is_freed_by_the_destination(kvm: KvmModel) -> None:
    src = sev_vm(kvm)
    asid = src.sev.asid
    dst = vm_with_vcpus(kvm, 0)
    move(kvm, dst, src)
    kvm.kvm_put_kvm(src)  # nothing SEV-related is freed with the dead source
    assert src.destroyed and asid not in kvm.reclaim_asid_bitmap
    assert kvm.fw.guests  # the guest context lives on
    kvm.kvm_put_kvm(dst)
    assert asid in kvm.reclaim_asid_bitmap and not kvm.fw.guests
    assert kvm.misc.usage[("/", "sev")] == 0


# ------------------------------------------------------------------------------------------
# commands, init, launch (sev_mem_enc_ioctl, __sev_guest_init, the launch handlers)


def test_sev_disabled_is_enotty() -> None:
    kvm, _ = make_model(sev_enabled=False)
    vm = kvm.create_vm(ME, VmType.DEFAULT)
    assert kerr(lambda: op(kvm, vm, SevCommand.INIT)).errno == errno.ENOTTY


def test_commands_on_a_non_sev_vm(kvm: KvmModel) -> None:
    vm = vm_with_vcpus(kvm, 0)
    for cmd in (
        SevCommand.LAUNCH_START,
        SevCommand.LAUNCH_UPDATE_DATA,
        SevCommand.LAUNCH_UPDATE_VMSA,
        SevCommand.LAUNCH_MEASURE,
        SevCommand.LAUNCH_SECRET,
        SevCommand.LAUNCH_FINISH,
        SevCommand.GUEST_STATUS,
        SevCommand.SNP_LAUNCH_START,
    ):
        assert kerr(lambda cmd=cmd: op(kvm, vm, cmd, {})).errno == errno.ENOTTY  # type: ignore[misc]
    for cmd in (19, 10, 14, 23, 99, SevCommand.SNP_LAUNCH_UPDATE, SEV_NR_MAX):
        assert kerr(lambda cmd=cmd: op(kvm, vm, cmd, {})).errno == errno.EINVAL  # type: ignore[misc]


def test_init_rules(kvm: KvmModel) -> None:
    vm = vm_with_vcpus(kvm, 1)
    err = kerr(lambda: op(kvm, vm, SevCommand.INIT))
    assert err.errno == errno.EINVAL and "before vCPUs" in err.detail
    vm2 = kvm.create_vm(ME, VmType.DEFAULT)
    op(kvm, vm2, SevCommand.INIT)
    assert kerr(lambda: op(kvm, vm2, SevCommand.ES_INIT)).errno == errno.EINVAL
    assert kerr(lambda: op(kvm, vm2, SevCommand.INIT2, {})).errno == errno.EINVAL
    typed = kvm.create_vm(ME, VmType.SEV_ES)
    assert typed.sev.need_init
    assert kerr(lambda: op(kvm, typed, SevCommand.ES_INIT)).errno == errno.EINVAL
    assert kerr(lambda: op(kvm, typed, SevCommand.INIT2, None)).errno == errno.EFAULT
    assert kerr(lambda: op(kvm, typed, SevCommand.INIT2, {"flags": 1})).errno == errno.EINVAL
    bad_features = {"vmsa_features": 1 << 3}
    assert kerr(lambda: op(kvm, typed, SevCommand.INIT2, bad_features)).errno == errno.EINVAL
    assert kerr(lambda: op(kvm, typed, SevCommand.INIT2, {"ghcb_version": 3})).errno == (
        errno.EINVAL
    )
    op(kvm, typed, SevCommand.INIT2, {"vmsa_features": 1 << 5})
    assert typed.sev.es_active and not typed.sev.need_init and typed.sev.ghcb_version == 2
    sev_typed = kvm.create_vm(ME, VmType.SEV)
    assert kerr(lambda: op(kvm, sev_typed, SevCommand.INIT2, {"ghcb_version": 1})).errno == (
        errno.EINVAL
    )
    # Legacy SEV-ES keeps GHCB version 1.
    legacy = kvm.create_vm(ME, VmType.DEFAULT)
    op(kvm, legacy, SevCommand.ES_INIT)
    assert legacy.sev.ghcb_version == 1


def test_launch_start_needs_a_dev_sev_fd(kvm: KvmModel) -> None:
    vm = sev_vm(kvm, launch=False)
    err = kerr(lambda: kvm.sev_mem_enc_ioctl(task(), ME, vm, 2, {"policy": 0}, 99))
    assert err.errno == errno.EBADF
    assert kerr(lambda: op(kvm, vm, SevCommand.LAUNCH_START, None)).errno == errno.EFAULT


def test_guest_states_and_refused_commands(kvm: KvmModel) -> None:
    vm = sev_vm(kvm, launch=False)
    # Before LAUNCH_START the recorded /dev/sev fd is 0: the caller's fd 0 is looked up.
    assert kerr(lambda: op(kvm, vm, SevCommand.GUEST_STATUS, {})).errno == errno.EBADF
    stdin_is_sev = FakeCaller(sev_fds={0, SEV_FD})
    err = kerr(lambda: op(kvm, vm, SevCommand.GUEST_STATUS, {}, stdin_is_sev))
    assert (err.errno, err.firmware_error) == (errno.EIO, FirmwareError.INVALID_GUEST)
    op(kvm, vm, SevCommand.LAUNCH_START, {"policy": 0})
    assert op(kvm, vm, SevCommand.GUEST_STATUS, {})["state"] == 1  # LUPDATE

    def fw_error(cmd: SevCommand, data: dict[str, Any] | None = None) -> FirmwareError | None:
        e = kerr(lambda: op(kvm, vm, cmd, data))
        assert e.errno == errno.EIO
        return e.firmware_error

    secret = {"guest_uaddr": 0x1000, "guest_len": 16, "hdr": b"h" * 52, "trans": b"s" * 16}
    assert fw_error(SevCommand.LAUNCH_SECRET, secret) == FirmwareError.INVALID_GUEST_STATE
    data = {"uaddr": 0x1000, "len": 32, "bytes": b"d" * 32}
    op(kvm, vm, SevCommand.LAUNCH_UPDATE_DATA, data)
    blob = op(kvm, vm, SevCommand.LAUNCH_MEASURE, {"len": 48})["blob"]
    assert len(blob) == 48
    assert op(kvm, vm, SevCommand.GUEST_STATUS, {})["state"] == 2  # LSECRET
    assert fw_error(SevCommand.LAUNCH_UPDATE_DATA, data) == FirmwareError.INVALID_GUEST_STATE
    assert fw_error(SevCommand.LAUNCH_MEASURE, {"len": 48}) == FirmwareError.INVALID_GUEST_STATE
    op(kvm, vm, SevCommand.LAUNCH_FINISH)
    assert op(kvm, vm, SevCommand.GUEST_STATUS, {})["state"] == 3  # RUNNING
    assert fw_error(SevCommand.LAUNCH_FINISH) == FirmwareError.INVALID_GUEST_STATE
    assert fw_error(SevCommand.SEND_FINISH) == FirmwareError.INVALID_GUEST_STATE
    assert fw_error(SevCommand.RECEIVE_FINISH) == FirmwareError.INVALID_GUEST_STATE


def test_launch_finish_straight_from_lupdate(kvm: KvmModel) -> None:
    vm = sev_vm(kvm)
    op(kvm, vm, SevCommand.LAUNCH_FINISH)
    assert op(kvm, vm, SevCommand.GUEST_STATUS, {})["state"] == 3


def test_launch_measure_length_query(kvm: KvmModel) -> None:
    vm = sev_vm(kvm)
    err = kerr(lambda: op(kvm, vm, SevCommand.LAUNCH_MEASURE, {"len": 0}))
    assert err.firmware_error == FirmwareError.INVALID_LEN and err.result == {"length": 48}
    assert op(kvm, vm, SevCommand.GUEST_STATUS, {})["state"] == 1  # unchanged
    assert kerr(lambda: op(kvm, vm, SevCommand.LAUNCH_MEASURE, {"len": 1 << 20})).errno == (
        errno.EINVAL
    )


def test_launch_update_vmsa_only_for_sev_es(kvm: KvmModel) -> None:
    vm = sev_vm(kvm)
    assert kerr(lambda: op(kvm, vm, SevCommand.LAUNCH_UPDATE_VMSA)).errno == errno.ENOTTY
    es = sev_vm(kvm, es=True, launch=False)
    op(kvm, es, SevCommand.LAUNCH_START, {"policy": SEV_POLICY_ES})
    bad = {"vmsas": [b"x"]}
    assert kerr(lambda: op(kvm, es, SevCommand.LAUNCH_UPDATE_VMSA, bad)).errno == errno.EINVAL
    # An SEV-ES guest launched without the ES policy bit: the firmware refuses ACTIVATE on an
    # SEV-ES ASID? No: the model only requires the ES bit for LAUNCH_UPDATE_VMSA.
    es2 = sev_vm(kvm, es=True, launch=False)
    op(kvm, es2, SevCommand.LAUNCH_START, {"policy": 0})
    e = kerr(lambda: op(kvm, es2, SevCommand.LAUNCH_UPDATE_VMSA))
    assert e.firmware_error == FirmwareError.POLICY_FAILURE


def test_es_policy_needs_an_es_asid(kvm: KvmModel) -> None:
    vm = sev_vm(kvm, launch=False)
    e = kerr(lambda: op(kvm, vm, SevCommand.LAUNCH_START, {"policy": SEV_POLICY_ES}))
    assert (e.errno, e.firmware_error) == (errno.EIO, FirmwareError.INVALID_ASID)
    assert not kvm.fw.guests  # the new context was decommissioned again
    assert vm.sev.handle == 0


def test_vcpu_enter_rules(kvm: KvmModel) -> None:
    es = sev_vm(kvm, es=True, vcpus=2)
    assert kvm.vcpu_enter(task(), ME, es, 0, "h") == b"v0"
    e = kerr(lambda: kvm.vcpu_enter(task(), ME, es, 0, "h"))
    assert e.errno == errno.EDEADLK
    kvm.vcpu_exit(es, 0, "h", b"new")
    assert es.vcpus[0].sev_es is not None and es.vcpus[0].sev_es.vmsa == b"new"
    kvm.vcpu_enter(task(), ME, es, 0, "h")
    assert kerr(lambda: kvm.vcpu_exit(es, 0, "h", None)).errno == errno.EINVAL
    assert kerr(lambda: kvm.vcpu_exit(es, 0, "other", b"x")).errno == errno.EPERM
    kvm.vcpu_exit(es, 0, "h", b"again")
    assert kerr(lambda: kvm.vcpu_enter(task(), ME, es, 5, "h")).errno == errno.EBADF
    plain = sev_vm(kvm, vcpus=1)
    assert kvm.vcpu_enter(task(), ME, plain, 0, "h") is None
    kvm.vcpu_exit(plain, 0, "h", None)
    typed = kvm.create_vm(ME, VmType.SEV)
    kvm.create_vcpu(task(), ME, typed, 0)
    assert kerr(lambda: kvm.vcpu_enter(task(), ME, typed, 0, "h")).errno == errno.EINVAL


def test_regions_accounting(kvm: KvmModel) -> None:
    vm = sev_vm(kvm)
    kvm.sev_mem_enc_register_region(task(), ME, vm, 0x1800, 0x1000)  # straddles 2 pages
    assert vm.sev.pages_locked == 2
    e = kerr(lambda: kvm.sev_mem_enc_unregister_region(task(), ME, vm, 0x1800, 0x800))
    assert e.errno == errno.EINVAL
    assert kerr(lambda: kvm.sev_mem_enc_register_region(task(), ME, vm, 0, 0)).errno == (
        errno.EINVAL
    )
    limited = FakeCaller(memlock=3)
    vm2 = sev_vm(kvm, caller=limited)
    kvm.sev_mem_enc_register_region(task(), limited, vm2, 0, 0x3000)
    e = kerr(lambda: kvm.sev_mem_enc_register_region(task(), limited, vm2, 0x10000, 0x1000))
    assert e.errno == errno.ENOMEM and "lock limit" in e.detail
    unmapped = FakeCaller(mapped=False)
    vm3 = sev_vm(kvm, caller=unmapped)
    e = kerr(lambda: kvm.sev_mem_enc_register_region(task(), unmapped, vm3, 0, 0x1000))
    assert e.errno == errno.ENOMEM
    kvm.sev_mem_enc_unregister_region(task(), ME, vm, 0x1800, 0x1000)
    assert vm.sev.pages_locked == 0 and vm.sev.regions == []
    # LAUNCH_UPDATE_DATA pins for the duration of the command only.
    op(kvm, vm, SevCommand.LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": 16, "bytes": b"x" * 16})
    assert vm.sev.pages_locked == 0


def test_ghcb_msr_starts_with_sev_info(kvm: KvmModel) -> None:
    es = sev_vm(kvm, es=True, vcpus=1)
    record = es.vcpus[0].sev_es
    assert record is not None
    assert record.ghcb_gpa == (1 << 48) | (1 << 32) | (51 << 24) | 1
    move(kvm, vm_with_vcpus(kvm, 1), es)
    assert kvm.inspect(es)["vcpus"][0]["ghcb_gpa"] == INVALID_PAGE
