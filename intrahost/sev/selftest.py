"""The kernel's ``tools/testing/selftests/kvm/x86/sev_migrate_tests.c`` and
``sev_init2_tests.c``, on any SEV platform.

Every scenario of the current mainline selftests, written against the
:class:`~intrahost.sev.interface.SevPlatform` interface, so the same cases run on the model
and on a real SEV host (``tests/sev/test_sev_selftest.py`` runs them under pytest; the CLI's
``intrahost selftest`` runs :data:`CASES` and prints the results as a table, one block per
selftest file).

Helpers keep the selftests' names: ``sev_vm_create`` (default-type VM, KVM_SEV_INIT or
KVM_SEV_ES_INIT, 4 vCPUs, ``sev_vm_launch``, and for SEV-ES one more LAUNCH_UPDATE_VMSA as
the current test does), ``aux_vm_create``, ``sev_migrate_from`` and ``sev_mirror_create``;
``test_init2`` and ``test_init2_invalid`` of the INIT2 test. The INIT2 cases need a platform
with the SEV VM types (the selftest's ``TEST_REQUIRE`` on ``KVM_CAP_VM_TYPES``) and are
skipped, with that reason, where it has none.
"""

from __future__ import annotations

import errno
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from intrahost.errors import IntrahostError
from intrahost.sev.interface import (
    GHCB_VERSION_MAX,
    SEV_POLICY_ES,
    SVM_SEV_FEAT_DEBUG_SWAP,
    GuestState,
    SevCommand,
    SevError,
    SevPlatform,
    SevVm,
    VmType,
)

NR_MIGRATE_TEST_VCPUS = 4
NR_MIGRATE_TEST_VMS = 3
NR_LOCK_TESTING_THREADS = 3
NR_LOCK_TESTING_ITERATIONS = 10000

#: What a MOVE in the locking test may return: success, self-move or already-SEV/not-SEV
#: (EINVAL), a collision (EBUSY), a dead destination (EIO).
LOCKING_EXPECTED = frozenset({0, errno.EINVAL, errno.EBUSY, errno.EIO})


class SelftestFailure(IntrahostError):
    """A selftest assertion failed (the message says which and what was seen)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestFailure(message)


def _errno_of(call: Callable[[], object]) -> int:
    """0 if ``call`` succeeds, else the errno of its :class:`SevError` (the C ``errno``)."""
    try:
        call()
    except SevError as err:
        return err.errno
    return 0


def _expect(call: Callable[[], object], expected: int, message: str) -> None:
    got = _errno_of(call)
    _check(
        got == expected,
        f"{message}: expected {errno.errorcode.get(expected, expected)}, "
        f"got {errno.errorcode.get(got, 'success') if got else 'success'}",
    )


class _VmSet:
    """The VMs a case creates, all freed at the end (``kvm_vm_free``)."""

    def __init__(self) -> None:
        self.vms: list[SevVm] = []

    def add(self, vm: SevVm) -> SevVm:
        self.vms.append(vm)
        return vm

    def free(self, vm: SevVm) -> None:
        vm.close()

    def close_all(self) -> None:
        for vm in self.vms:
            vm.close()


@contextmanager
def _vms() -> Iterator[_VmSet]:
    vms = _VmSet()
    try:
        yield vms
    finally:
        vms.close_all()


# ------------------------------------------------------------------------------------------
# helpers of the selftest


def sev_vm_launch(vm: SevVm, policy: int) -> None:
    """``sev_vm_launch``: LAUNCH_START, GUEST_STATUS checks, (ES) LAUNCH_UPDATE_VMSA.

    A barebones VM has no memory regions, so there is no LAUNCH_UPDATE_DATA.
    """
    vm.launch_start(policy)
    status = vm.guest_status()
    _check(status.policy == policy, f"GUEST_STATUS policy {status.policy:#x} != {policy:#x}")
    _check(
        status.state == GuestState.LUPDATE,
        f"GUEST_STATUS state {status.state.name} after LAUNCH_START, expected LUPDATE",
    )
    if policy & SEV_POLICY_ES:
        vm.launch_update_vmsa()


def sev_vm_create(platform: SevPlatform, es: bool, vms: _VmSet) -> SevVm:
    vm = vms.add(platform.create_vm())
    if es:
        vm.sev_es_init()
    else:
        vm.sev_init()
    for i in range(NR_MIGRATE_TEST_VCPUS):
        vm.create_vcpu(i)
    sev_vm_launch(vm, SEV_POLICY_ES if es else 0)
    if es:
        vm.launch_update_vmsa()
    return vm


def aux_vm_create(platform: SevPlatform, with_vcpus: bool, vms: _VmSet) -> SevVm:
    vm = vms.add(platform.create_vm())
    if with_vcpus:
        for i in range(NR_MIGRATE_TEST_VCPUS):
            vm.create_vcpu(i)
    return vm


def __sev_migrate_from(dst: SevVm, src: SevVm) -> int:
    return _errno_of(lambda: dst.move_enc_context_from(src.fd))


def sev_migrate_from(dst: SevVm, src: SevVm) -> None:
    err = __sev_migrate_from(dst, src)
    _check(err == 0, f"Migration failed, errno: {errno.errorcode.get(err, err)}")


def __sev_mirror_create(dst: SevVm, src: SevVm) -> int:
    return _errno_of(lambda: dst.copy_enc_context_from(src.fd))


def sev_mirror_create(dst: SevVm, src: SevVm) -> None:
    err = __sev_mirror_create(dst, src)
    _check(err == 0, f"Copying context failed, errno: {errno.errorcode.get(err, err)}")


# ------------------------------------------------------------------------------------------
# the tests


def test_sev_migrate_from(platform: SevPlatform, es: bool) -> None:
    """src -> dst0 -> dst1 -> dst2, then moving back into the dead src fails with EIO."""
    with _vms() as vms:
        src_vm = sev_vm_create(platform, es, vms)
        dst_vms = [aux_vm_create(platform, True, vms) for _ in range(NR_MIGRATE_TEST_VMS)]
        sev_migrate_from(dst_vms[0], src_vm)
        for i in range(1, NR_MIGRATE_TEST_VMS):
            sev_migrate_from(dst_vms[i], dst_vms[i - 1])
        _expect(
            lambda: src_vm.move_enc_context_from(dst_vms[-1].fd),
            errno.EIO,
            "VM that was migrated from should be dead",
        )


@dataclass
class LockingResult:
    """What the locking test saw: every MOVE's result, counted by errno (0 = success)."""

    results: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    thread_errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.results.values())

    def summary(self) -> str:
        parts = [
            f"{errno.errorcode.get(e, 'success') if e else 'success'}={n}"
            for e, n in sorted(self.results.items())
        ]
        return f"{self.total} moves in {self.seconds:.2f} s: " + ", ".join(parts)


def test_sev_migrate_locking(
    platform: SevPlatform, iterations: int = NR_LOCK_TESTING_ITERATIONS
) -> LockingResult:
    """3 threads, each moving into its own VM from all three in turn: no deadlock."""
    outcome = LockingResult()
    lock = threading.Lock()
    with _vms() as vms:
        test_vms = [sev_vm_create(platform, False, vms) for _ in range(NR_LOCK_TESTING_THREADS)]

        def locking_test_thread(vm: SevVm) -> None:
            seen: Counter[int] = Counter()
            try:
                for i in range(iterations):
                    seen[__sev_migrate_from(vm, test_vms[i % NR_LOCK_TESTING_THREADS])] += 1
            except Exception as err:
                with lock:
                    outcome.thread_errors.append(repr(err))
            with lock:
                outcome.results.update(seen)

        threads = [
            threading.Thread(target=locking_test_thread, args=(vm,), name=f"locking-{i}")
            for i, vm in enumerate(test_vms)
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcome.seconds = time.monotonic() - start
    _check(not outcome.thread_errors, f"locking threads failed: {outcome.thread_errors}")
    unexpected = set(outcome.results) - LOCKING_EXPECTED
    _check(not unexpected, f"unexpected results in the locking test: {outcome.summary()}")
    _check(
        outcome.total == iterations * NR_LOCK_TESTING_THREADS,
        f"expected {iterations * NR_LOCK_TESTING_THREADS} moves, saw {outcome.total}",
    )
    return outcome


def test_sev_migrate_parameters(platform: SevPlatform, have_sev_es: bool) -> None:
    with _vms() as vms:
        vm_no_vcpu = vms.add(platform.create_vm())
        vm_no_sev = aux_vm_create(platform, True, vms)
        _expect(
            lambda: vm_no_vcpu.move_enc_context_from(vm_no_sev.fd),
            errno.EINVAL,
            "Migrations require SEV enabled",
        )
        if not have_sev_es:
            return
        sev_vm = sev_vm_create(platform, False, vms)
        sev_es_vm = sev_vm_create(platform, True, vms)
        sev_es_vm_no_vmsa = vms.add(platform.create_vm())
        sev_es_vm_no_vmsa.sev_es_init()
        sev_es_vm_no_vmsa.create_vcpu(1)
        _expect(
            lambda: sev_vm.move_enc_context_from(sev_es_vm.fd),
            errno.EINVAL,
            "Should not be able migrate to SEV enabled VM",
        )
        _expect(
            lambda: sev_es_vm.move_enc_context_from(sev_vm.fd),
            errno.EINVAL,
            "Should not be able migrate to SEV-ES enabled VM",
        )
        _expect(
            lambda: vm_no_vcpu.move_enc_context_from(sev_es_vm.fd),
            errno.EINVAL,
            "SEV-ES migrations require same number of vCPUS",
        )
        _expect(
            lambda: vm_no_vcpu.move_enc_context_from(sev_es_vm_no_vmsa.fd),
            errno.EINVAL,
            "SEV-ES migrations require UPDATE_VMSA",
        )


def verify_mirror_allowed_cmds(vm: SevVm, sev_nr_max: int) -> None:
    """Every command but the four a mirror may issue fails with EINVAL (before its payload).

    The sweep runs to the platform's ``KVM_SEV_NR_MAX`` (the selftest's compile-time bound,
    which grew with ``KVM_SEV_SNP_ENABLE_REQ_CERTS``)."""
    allowed = {
        SevCommand.LAUNCH_UPDATE_VMSA,
        SevCommand.GUEST_STATUS,
        SevCommand.DBG_DECRYPT,
        SevCommand.DBG_ENCRYPT,
    }
    for cmd_id in range(SevCommand.INIT, sev_nr_max):
        if cmd_id in allowed:
            continue
        _expect(
            functools.partial(vm.raw_command, cmd_id),
            errno.EINVAL,
            f"Should not be able call command: {cmd_id}",
        )
    vm.guest_status()


def test_sev_mirror(platform: SevPlatform, es: bool) -> None:
    with _vms() as vms:
        src_vm = sev_vm_create(platform, es, vms)
        dst_vm = aux_vm_create(platform, False, vms)
        sev_mirror_create(dst_vm, src_vm)
        # Check that we can complete creation of the mirror VM.
        for i in range(NR_MIGRATE_TEST_VCPUS):
            dst_vm.create_vcpu(i)
        if es:
            dst_vm.launch_update_vmsa()
        verify_mirror_allowed_cmds(dst_vm, platform.info.sev_nr_max)


def test_sev_mirror_parameters(platform: SevPlatform, have_sev_es: bool) -> None:
    with _vms() as vms:
        sev_vm = sev_vm_create(platform, False, vms)
        vm_with_vcpu = aux_vm_create(platform, True, vms)
        vm_no_vcpu = aux_vm_create(platform, False, vms)
        _expect(
            lambda: sev_vm.copy_enc_context_from(sev_vm.fd),
            errno.EINVAL,
            "Should not be able copy context to self",
        )
        _expect(
            lambda: vm_no_vcpu.copy_enc_context_from(vm_with_vcpu.fd),
            errno.EINVAL,
            "Copy context requires SEV enabled",
        )
        _expect(
            lambda: vm_with_vcpu.copy_enc_context_from(sev_vm.fd),
            errno.EINVAL,
            "SEV copy context requires no vCPUS on the destination",
        )
        if not have_sev_es:
            return
        sev_es_vm = sev_vm_create(platform, True, vms)
        _expect(
            lambda: sev_vm.copy_enc_context_from(sev_es_vm.fd),
            errno.EINVAL,
            "Should not be able copy context to SEV enabled VM",
        )
        _expect(
            lambda: sev_es_vm.copy_enc_context_from(sev_vm.fd),
            errno.EINVAL,
            "Should not be able copy context to SEV-ES enabled VM",
        )


def test_sev_move_copy(platform: SevPlatform) -> None:
    """Owners and mirrors moved in a chain; freed owner-first, then (round 2) mirror-first."""
    with _vms() as vms:
        sev_vm = sev_vm_create(platform, False, vms)
        dst_vm = aux_vm_create(platform, True, vms)
        dst2_vm = aux_vm_create(platform, True, vms)
        dst3_vm = aux_vm_create(platform, True, vms)
        mirror_vm = aux_vm_create(platform, False, vms)
        dst_mirror_vm = aux_vm_create(platform, False, vms)
        dst2_mirror_vm = aux_vm_create(platform, False, vms)
        dst3_mirror_vm = aux_vm_create(platform, False, vms)

        sev_mirror_create(mirror_vm, sev_vm)
        sev_migrate_from(dst_mirror_vm, mirror_vm)
        sev_migrate_from(dst_vm, sev_vm)
        sev_migrate_from(dst2_vm, dst_vm)
        sev_migrate_from(dst2_mirror_vm, dst_mirror_vm)
        sev_migrate_from(dst3_mirror_vm, dst2_mirror_vm)
        sev_migrate_from(dst3_vm, dst2_vm)

        for vm in (
            dst_vm,
            sev_vm,
            dst2_vm,
            dst3_vm,
            mirror_vm,
            dst_mirror_vm,
            dst2_mirror_vm,
            dst3_mirror_vm,
        ):
            vms.free(vm)

    # Run a similar test but destroy mirrors before mirrored VMs to ensure destruction is
    # done safely.
    with _vms() as vms:
        sev_vm = sev_vm_create(platform, False, vms)
        dst_vm = aux_vm_create(platform, True, vms)
        mirror_vm = aux_vm_create(platform, False, vms)
        dst_mirror_vm = aux_vm_create(platform, False, vms)

        sev_mirror_create(mirror_vm, sev_vm)
        sev_migrate_from(dst_mirror_vm, mirror_vm)
        sev_migrate_from(dst_vm, sev_vm)

        for vm in (mirror_vm, dst_mirror_vm, dst_vm, sev_vm):
            vms.free(vm)


# ------------------------------------------------------------------------------------------
# sev_init2_tests.c

#: Features that may be passed one by one to KVM_SEV_INIT2 (the selftest's KNOWN_FEATURES).
KNOWN_FEATURES = SVM_SEV_FEAT_DEBUG_SWAP


def test_init2(platform: SevPlatform, vm_type: VmType, **init: int) -> None:
    """KVM_SEV_INIT2 with ``init`` (``struct kvm_sev_init``) on a fresh VM of ``vm_type``
    succeeds."""
    with _vms() as vms:
        vm = vms.add(platform.create_vm(vm_type))
        err = _errno_of(lambda: vm.sev_init2(**init))
        _check(
            err == 0,
            f"KVM_SEV_INIT2 on {vm_type.name} with {init or 'zeroes'} failed: "
            f"{errno.errorcode.get(err, err)} (expected success)",
        )


def test_init2_invalid(platform: SevPlatform, vm_type: VmType, msg: str, **init: int) -> None:
    """KVM_SEV_INIT2 with ``init`` on a fresh VM of ``vm_type`` fails with EINVAL."""
    with _vms() as vms:
        vm = vms.add(platform.create_vm(vm_type))
        _expect(lambda: vm.sev_init2(**init), errno.EINVAL, f"KVM_SEV_INIT2 should fail, {msg}")


def _have(platform: SevPlatform, vm_type: VmType) -> bool:
    return vm_type in platform.info.supported_vm_types


def _init2_types(platform: SevPlatform) -> list[VmType]:
    return [t for t in (VmType.SEV, VmType.SEV_ES, VmType.SNP) if _have(platform, t)]


def test_vm_types(platform: SevPlatform) -> None:
    """INIT2 works on every SEV type the platform offers; not on the default or the
    software-protected type."""
    for vm_type in _init2_types(platform):
        test_init2(platform, vm_type)
    test_init2_invalid(platform, VmType.DEFAULT, "VM type is KVM_X86_DEFAULT_VM")
    if _have(platform, VmType.SW_PROTECTED):
        test_init2_invalid(platform, VmType.SW_PROTECTED, "VM type is KVM_X86_SW_PROTECTED_VM")


def test_flags(platform: SevPlatform) -> None:
    """Every bit of ``flags`` is refused, on every SEV type."""
    for vm_type in _init2_types(platform):
        for i in range(32):
            test_init2_invalid(platform, vm_type, f"invalid flag {1 << i:#x}", flags=1 << i)


def test_features(platform: SevPlatform) -> None:
    """Every VMSA feature bit the platform does not offer is refused (all of them for plain
    SEV); the known offered ones are accepted one by one."""
    supported = platform.info.supported_vmsa_features
    for vm_type in _init2_types(platform):
        features = 0 if vm_type == VmType.SEV else supported
        for i in range(64):
            bit = 1 << i
            if not features & bit:
                test_init2_invalid(
                    platform, vm_type, f"unknown feature {bit:#x}", vmsa_features=bit
                )
            elif KNOWN_FEATURES & bit:
                test_init2(platform, vm_type, vmsa_features=bit)


def test_ghcb_version(platform: SevPlatform) -> None:
    """Not in the selftest; the rules of ``__sev_guest_init`` (``sev.c``): an SEV-ES or SNP
    VM takes GHCB protocol version 0 (the default, 2), 1 or 2 and nothing above
    ``GHCB_VERSION_MAX``; a plain SEV VM takes none but 0."""
    for vm_type in _init2_types(platform):
        if vm_type == VmType.SEV:
            for version in range(1, GHCB_VERSION_MAX + 2):
                test_init2_invalid(
                    platform, vm_type, f"SEV has no GHCB (version {version})", ghcb_version=version
                )
            continue
        for version in range(GHCB_VERSION_MAX + 1):
            test_init2(platform, vm_type, ghcb_version=version)
        test_init2_invalid(
            platform, vm_type, "GHCB version above the maximum", ghcb_version=GHCB_VERSION_MAX + 1
        )


def needs_sev_vm_types(platform: SevPlatform) -> str | None:
    """The INIT2 selftest's ``TEST_REQUIRE``: the platform offers ``KVM_X86_SEV_VM``."""
    if _have(platform, VmType.SEV):
        return None
    offered = ", ".join(t.name for t in platform.info.supported_vm_types)
    return (
        f"KVM_CAP_VM_TYPES offers no SEV VM type here (only {offered}): KVM_SEV_INIT2 needs "
        "Linux 6.10 or later on a host with SEV enabled"
    )


def needs_sev_es(platform: SevPlatform) -> str | None:
    return None if platform.info.sev_es_enabled else "the platform has no SEV-ES"


# ------------------------------------------------------------------------------------------
# the suite

MIGRATE_TESTS = "sev_migrate_tests"
INIT2_TESTS = "sev_init2_tests"


@dataclass(frozen=True)
class SelftestCase:
    name: str
    run: Callable[[SevPlatform], object]
    #: None when the case can run on a platform, else why it is skipped there.
    requires: Callable[[SevPlatform], str | None] = lambda platform: None
    #: The selftest file the case comes from.
    suite: str = MIGRATE_TESTS


def _es(platform: SevPlatform) -> bool:
    return platform.info.sev_es_enabled


#: The order of the selftests' ``main``: sev_migrate_tests.c, then sev_init2_tests.c.
CASES: tuple[SelftestCase, ...] = (
    SelftestCase("migrate_from_sev", lambda p: test_sev_migrate_from(p, es=False)),
    SelftestCase("migrate_from_sev_es", lambda p: test_sev_migrate_from(p, es=True), needs_sev_es),
    SelftestCase("migrate_locking", test_sev_migrate_locking),
    SelftestCase("migrate_parameters", lambda p: test_sev_migrate_parameters(p, _es(p))),
    SelftestCase("move_copy", test_sev_move_copy),
    SelftestCase("mirror_sev", lambda p: test_sev_mirror(p, es=False)),
    SelftestCase("mirror_sev_es", lambda p: test_sev_mirror(p, es=True), needs_sev_es),
    SelftestCase("mirror_parameters", lambda p: test_sev_mirror_parameters(p, _es(p))),
    SelftestCase("init2_vm_types", test_vm_types, needs_sev_vm_types, INIT2_TESTS),
    SelftestCase("init2_flags", test_flags, needs_sev_vm_types, INIT2_TESTS),
    SelftestCase("init2_features", test_features, needs_sev_vm_types, INIT2_TESTS),
    SelftestCase("init2_ghcb_version", test_ghcb_version, needs_sev_vm_types, INIT2_TESTS),
)


@dataclass(frozen=True)
class CaseResult:
    name: str
    outcome: str
    seconds: float
    detail: str = ""


def run_case(platform: SevPlatform, case: SelftestCase) -> CaseResult:
    reason = case.requires(platform)
    if reason is not None:
        return CaseResult(case.name, "skipped", 0.0, reason)
    start = time.monotonic()
    try:
        value = case.run(platform)
    except (SelftestFailure, IntrahostError) as err:
        return CaseResult(case.name, "FAILED", time.monotonic() - start, str(err))
    detail = value.summary() if isinstance(value, LockingResult) else ""
    return CaseResult(case.name, "passed", time.monotonic() - start, detail)


def run_all(platform: SevPlatform) -> list[CaseResult]:
    """Every case, in the selftest's order."""
    return [run_case(platform, case) for case in CASES]


def run_all_except(platform: SevPlatform, skip: set[str]) -> list[CaseResult]:
    """Every case but those named in ``skip`` (e.g. the long locking test)."""
    return [run_case(platform, case) for case in CASES if case.name not in skip]
