"""The kernel's sev_migrate_tests.c and sev_init2_tests.c (tools/testing/selftests/kvm/x86/),
every scenario, on every platform.

The cases live in ``intrahost.sev.selftest`` so that ``intrahost selftest`` runs the same code.
On the model, each case must also leave nothing behind: every VM destroyed and no ASID held
(the selftest frees all its VMs; a leak would show up here).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from sev_testlib import ServiceHandle, start_service, wait_idle

from intrahost.sev import (
    PlatformInfo,
    SevError,
    SevPlatform,
    VmType,
    open_platform,
    unavailable_reason,
)
from intrahost.sev import selftest as st
from intrahost.sevmodel.client import ModelPlatform


@pytest.fixture(scope="module")
def selftest_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    handle = start_service(tmp_path_factory.mktemp("sev-selftest"))
    yield handle
    handle.stop()


@pytest.fixture(params=["model", "kernel"])
def sev_platform(
    request: pytest.FixtureRequest, selftest_service: ServiceHandle
) -> Iterator[SevPlatform]:
    if request.param == "kernel":
        reason = unavailable_reason("kernel")
        if reason is not None:
            pytest.skip(f"kernel platform: {reason}")
        platform = open_platform("kernel")
    else:
        platform = selftest_service.platform()
    yield platform
    if isinstance(platform, ModelPlatform):
        wait_idle(platform)
    platform.close()


def _run(platform: SevPlatform, name: str) -> st.CaseResult:
    case = next(c for c in st.CASES if c.name == name)
    result = st.run_case(platform, case)
    if result.outcome == "skipped":
        pytest.skip(result.detail)
    assert result.outcome == "passed", result.detail
    return result


def test_migrate_from_sev(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "migrate_from_sev")


def test_migrate_from_sev_es(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "migrate_from_sev_es")


@pytest.mark.timeout(900)
def test_migrate_locking(sev_platform: SevPlatform) -> None:
    """3 threads x 10 000 moves (the selftest's full count): no deadlock, only 0/EINVAL/
    EBUSY/EIO. The timing goes to the report (-rA shows it)."""
    outcome = st.test_sev_migrate_locking(sev_platform)
    print(f"[{sev_platform.name}] locking: {outcome.summary()}")


def test_migrate_parameters(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "migrate_parameters")


def test_move_copy(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "move_copy")


def test_mirror_sev(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "mirror_sev")


def test_mirror_sev_es(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "mirror_sev_es")


def test_mirror_parameters(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "mirror_parameters")


def test_init2_vm_types(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "init2_vm_types")


def test_init2_flags(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "init2_flags")


def test_init2_features(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "init2_features")


def test_init2_ghcb_version(sev_platform: SevPlatform) -> None:
    _run(sev_platform, "init2_ghcb_version")


def test_every_case_has_a_test() -> None:
    names = {c.name for c in st.CASES}
    tested = {
        name.removeprefix("test_")
        for name in globals()
        if name.startswith("test_") and name != "test_every_case_has_a_test"
    }
    assert names <= tested


def test_run_all_reports_every_case(selftest_service: ServiceHandle) -> None:
    """What ``intrahost selftest`` prints, with a short locking run."""
    platform = selftest_service.platform()
    try:
        cases = [
            st.SelftestCase(c.name, c.run, c.requires, c.suite)
            if c.name != "migrate_locking"
            else st.SelftestCase(c.name, lambda p: st.test_sev_migrate_locking(p, 50))
            for c in st.CASES
        ]
        results = [st.run_case(platform, c) for c in cases]
        assert [r.name for r in results] == [c.name for c in st.CASES]
        assert all(r.outcome == "passed" for r in results), results
        assert "150 moves" in results[2].detail
        assert {c.suite for c in st.CASES} == {st.MIGRATE_TESTS, st.INIT2_TESTS}
    finally:
        wait_idle(platform)
        platform.close()


def test_the_mirror_sweep_runs_to_the_platforms_bound(selftest_service: ServiceHandle) -> None:
    """The selftest sweeps command ids up to KVM_SEV_NR_MAX, which grew to 104 with
    KVM_SEV_SNP_ENABLE_REQ_CERTS (Linux 6.20): the bound is the platform's, not a constant."""
    platform = selftest_service.platform()
    try:
        assert platform.info.sev_nr_max == 104
        seen: list[int] = []

        class Recording:
            def raw_command(self, command: int) -> None:
                seen.append(command)
                raise SevError("raw", errno.EINVAL)

            def guest_status(self) -> None:
                pass

        st.verify_mirror_allowed_cmds(Recording(), 42)  # type: ignore[arg-type]
        assert max(seen) == 41
        st.verify_mirror_allowed_cmds(Recording(), platform.info.sev_nr_max)  # type: ignore[arg-type]
        assert max(seen) == 103
    finally:
        platform.close()


def test_init2_cases_skip_without_the_sev_vm_types() -> None:
    """The INIT2 selftest's TEST_REQUIRE: without KVM_X86_SEV_VM in KVM_CAP_VM_TYPES (this
    host's kernel, for one) every INIT2 case is skipped, and says why."""
    kernel_like = PlatformInfo(
        name="kernel",
        sev_enabled=False,
        sev_es_enabled=False,
        max_sev_asid=0,
        min_sev_asid=1,
        cbit_position=0,
        api_major=0,
        api_minor=0,
        build=0,
        supported_vmsa_features=0,
        supported_vm_types=(VmType.DEFAULT,),
    )

    class NoSevTypes:
        info = kernel_like

    for case in st.CASES:
        if case.suite != st.INIT2_TESTS:
            continue
        result = st.run_case(NoSevTypes(), case)  # type: ignore[arg-type]
        assert result.outcome == "skipped"
        assert "KVM_CAP_VM_TYPES" in result.detail and "6.10" in result.detail


def test_init2_cases_follow_the_platforms_types(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without SEV-ES (and so without SNP) the INIT2 cases run on the SEV type alone."""
    handle = start_service(tmp_path_factory.mktemp("sev-init2-noes"), "--no-sev-es")
    try:
        platform = handle.platform()
        assert platform.info.supported_vm_types == (VmType.DEFAULT, VmType.SEV)
        for case in st.CASES:
            if case.suite == st.INIT2_TESTS:
                assert st.run_case(platform, case).outcome == "passed"
        wait_idle(platform)
        platform.close()
    finally:
        handle.stop()


def test_es_cases_skip_without_sev_es(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    handle = start_service(tmp_path_factory.mktemp("sev-noes"), "--no-sev-es")
    try:
        platform = handle.platform()
        assert not platform.info.sev_es_enabled
        results = {r.name: r for r in st.run_all_except(platform, {"migrate_locking"})}
        assert results["migrate_from_sev_es"].outcome == "skipped"
        assert results["mirror_sev_es"].outcome == "skipped"
        assert all(r.outcome in ("passed", "skipped") for r in results.values()), results
        platform.close()
    finally:
        handle.stop()
