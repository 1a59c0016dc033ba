"""Rollback: the previous release, installed from this repository's own history into its own
virtual environment, takes a running guest from this tree and hands it back. The guest goes
old -> new -> old -> new, each VMM driven by its own ``intrahost`` with its own flags; after
every hop its counters have moved on and its memory regions verify.

Each hop also exercises version negotiation against the real previous release: v0.1.0's
source sends a START without a version range (this tree takes it as exactly its version), and
this tree's source sends keys v0.1.0 does not know (it ignores them) and a state it reads.

The first run installs the previous release (git archive, venv, pip: about half a minute);
later runs reuse it (see ``releases.installed``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from releases import Release, installed, previous_release, require_in_history
from support import needs_kvm, wait_for_path
from test_handoff import PROGRESS, Observer, assert_uart_continuous

import intrahost
from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout

pytestmark = needs_kvm

VCPUS = 2


class Side:
    """One release's ``intrahost``: its command and environment."""

    def __init__(self, version: str, command: list[str], env: dict[str, str]) -> None:
        self.version = version
        self.command = command
        self.env = env

    def popen(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [*self.command, "--log-level", "info", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=log.parent,
            )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )


@pytest.fixture(scope="module")
def previous() -> tuple[Release, Path]:
    release = previous_release()
    require_in_history(release)
    return release, installed(release)


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/ih-rollback-{uuid.uuid4().hex[:12]}")
    yield path
    path.unlink(missing_ok=True)


def _counters(api: Path) -> list[int]:
    with QmpClient(api) as qmp:
        return [c["count"] for c in qmp.execute("query-vm").get("counter", [])]


def _wait_counters_above(api: Path, floor: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        now = _counters(api)
        if len(now) == len(floor) and all(b > a for a, b in zip(floor, now, strict=True)):
            return now
        assert time.monotonic() < deadline, f"the counters did not move on from {floor}: {now}"
        time.sleep(0.05)


def _check_release(api: Path, side: Side) -> None:
    with QmpClient(api) as qmp:
        assert qmp.execute("query-version")["package"] == f"intrahost {side.version}"


def _verify_memory(api: Path, observer: Observer) -> None:
    """Pause, check every vCPU's region against its counter, resume."""
    with QmpClient(api) as qmp:
        qmp.execute("stop")
        for vcpu in range(VCPUS):
            layout.verify_region(observer.map, vcpu)
        qmp.execute("cont")


def test_a_guest_goes_old_new_old_new(
    previous: tuple[Release, Path], sockdir: Path, shm_file: Path
) -> None:
    release, old_intrahost = previous
    old_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    old = Side(release.version, [str(old_intrahost)], old_env)
    new = Side(intrahost.__version__, [sys.executable, "-m", "intrahost"], dict(os.environ))
    sides = [old, new, old, new]
    procs: list[subprocess.Popen[bytes]] = []
    observer: Observer | None = None
    try:
        api = sockdir / "api-0.sock"
        procs.append(
            old.popen(
                [
                    "run",
                    "--memory",
                    "64M",
                    "--vcpus",
                    str(VCPUS),
                    "--guest",
                    "counter",
                    "--guest-args",
                    f"progress={PROGRESS}",
                    "--memory-path",
                    str(shm_file),
                    "--serial",
                    f"file:{sockdir / 'serial-0.log'}",
                    "--api-socket",
                    str(api),
                ],
                sockdir / "vmm-0.log",
            )
        )
        wait_for_path(api)
        _check_release(api, old)
        before = _wait_counters_above(api, [0] * VCPUS)
        observer = Observer(shm_file, VCPUS)
        for hop in range(1, len(sides)):
            source, target = sides[hop - 1], sides[hop]
            mig, new_api = sockdir / f"mig-{hop}.sock", sockdir / f"api-{hop}.sock"
            procs.append(
                target.popen(
                    [
                        "run",
                        "--incoming",
                        f"unix:{mig}",
                        "--api-socket",
                        str(new_api),
                        "--serial",
                        f"file:{sockdir / f'serial-{hop}.log'}",
                    ],
                    sockdir / f"vmm-{hop}.log",
                )
            )
            wait_for_path(mig)
            before = _counters(api)
            what = f"hop {hop}: {source.version} -> {target.version}"
            done = source.run("migrate", "--api-socket", str(api), f"unix:{mig}")
            assert done.returncode == 0, f"{what}: {done.stderr}"
            assert procs[-2].wait(20) == 0, f"{what}: the source VMM failed"
            api = new_api
            wait_for_path(api)
            _check_release(api, target)
            after = _wait_counters_above(api, before)
            _verify_memory(api, observer)
            _wait_counters_above(api, after)
        with QmpClient(api) as qmp:
            qmp.execute("quit")
        assert procs[-1].wait(20) == 0
    except BaseException:
        for i, _ in enumerate(procs):
            log = sockdir / f"vmm-{i}.log"
            print(f"--- {log.name}\n{log.read_text(errors='replace')}")
        raise
    finally:
        if observer is not None:
            observer.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert not observer.backwards, observer.backwards
    assert_uart_continuous(*(sockdir / f"serial-{hop}.log" for hop in range(len(sides))))


def test_a_repository_without_the_release_fails_saying_how_to_fetch_it(tmp_path: Path) -> None:
    def git(cwd: Path, *args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    full = tmp_path / "full"
    full.mkdir()
    git(full, "init", "-q")
    for n in range(2):
        (full / "f").write_text(str(n))
        git(full, "add", "f")
        git(full, "commit", "-qm", str(n))
    first = git(full, "rev-list", "--max-parents=0", "HEAD")
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{full}", "shallow")
    release = Release("0.0.1", first)
    require_in_history(release, full)  # present: nothing happens
    with pytest.raises(pytest.fail.Exception, match=r"`git fetch --unshallow`"):
        require_in_history(release, tmp_path / "shallow")
    missing = Release("0.0.1", "0" * 40)
    with pytest.raises(pytest.fail.Exception, match=r"`git fetch origin 0{40}`"):
        require_in_history(missing, full)
    sdist = tmp_path / "sdist"
    sdist.mkdir()
    with pytest.raises(pytest.skip.Exception, match="not a git checkout"):
        require_in_history(release, sdist)
