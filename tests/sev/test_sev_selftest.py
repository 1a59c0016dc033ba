"""The kernel's sev_migrate_tests.c, every scenario, on every platform (spec section 5).

The cases live in ``intrahost.sev.selftest`` so that ``intrahost selftest`` runs the same code.
On the model, each case must also leave nothing behind: every VM destroyed and no ASID held
(the selftest frees all its VMs; a leak would show up here).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sev_testlib import ServiceHandle, start_service, wait_idle

from intrahost.sev import SevPlatform, open_platform, unavailable_reason
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
            st.SelftestCase(c.name, c.run, c.needs_sev_es)
            if c.name != "migrate_locking"
            else st.SelftestCase(c.name, lambda p: st.test_sev_migrate_locking(p, 50))
            for c in st.CASES
        ]
        results = [st.run_case(platform, c) for c in cases]
        assert [r.name for r in results] == [c.name for c in st.CASES]
        assert all(r.outcome == "passed" for r in results), results
        assert "150 moves" in results[2].detail
    finally:
        wait_idle(platform)
        platform.close()


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
