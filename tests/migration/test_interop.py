"""A hand-off between this intrahost and intrahost 0.1 (commit e22a7a5), both directions: the
older peer names no START features, so the two-step sequence (STATE, then COMMIT) is spoken,
and the guest keeps running on the new VMM.

0.1 is taken from this repository's history (``git archive``); without git or that commit
(a shallow clone) the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs_kvm

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout

pytestmark = needs_kvm

REPO = Path(__file__).resolve().parents[2]
RELEASE = "e22a7a5"  # intrahost 0.1


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("git") is None:
        pytest.skip("needs git to check out intrahost 0.1")
    out = tmp_path_factory.mktemp("intrahost-0.1")
    archive = out / "release.tar"
    done = subprocess.run(
        ["git", "-C", str(REPO), "archive", "-o", str(archive), RELEASE, "intrahost"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"intrahost 0.1 ({RELEASE}) is not in this clone: {done.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    yield out


def _vmm(tree: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"PYTHONPATH": str(tree)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "intrahost", "--log-level", "info", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_path(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a VMM exited early"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _count(memory: Path) -> int:
    """The guest's counter, read from its memory file (intrahost 0.1 reports no counters)."""
    try:
        with memory.open("rb") as f:
            return layout.read_slot(f.read(layout.STATUS_END), 0).counter
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("old_side", ["source", "destination"])
def test_a_handoff_with_intrahost_0_1(old_side: str, release: Path, sockdir: Path) -> None:
    this = REPO
    src_tree, dst_tree = (release, this) if old_side == "source" else (this, release)
    api, api2, mig = sockdir / "a.sock", sockdir / "b.sock", sockdir / "m.sock"
    memory = Path(f"/dev/shm/ih-interop-{uuid.uuid4().hex[:10]}")
    src = _vmm(
        src_tree,
        ["run", "--memory", "32M", "--guest-args", "progress=1073741824", "--serial", "none",
         "--memory-path", str(memory), "--api-socket", str(api)],
        sockdir / "source.log",
    )  # fmt: skip
    dst = _vmm(
        dst_tree,
        ["run", "--incoming", f"unix:{mig}", "--api-socket", str(api2)],
        sockdir / "dest.log",
    )
    try:
        _wait_path(api, [src, dst])
        _wait_path(mig, [src, dst])
        deadline = time.monotonic() + 30
        while _count(memory) == 0:
            assert time.monotonic() < deadline, "the guest did not start counting"
            time.sleep(0.02)
        env = os.environ | {"PYTHONPATH": str(src_tree)}
        done = subprocess.run(
            [sys.executable, "-m", "intrahost", "migrate", "--api-socket", str(api),
             f"unix:{mig}"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "blackout:" in done.stdout
        assert src.wait(20) == 0, (sockdir / "source.log").read_text()
        _wait_path(api2, [dst])
        before = _count(memory)
        deadline = time.monotonic() + 10
        while _count(memory) == before:
            assert time.monotonic() < deadline, "the guest does not run on the new VMM"
            time.sleep(0.02)
        with QmpClient(api2) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
            qmp.execute("quit")
        assert dst.wait(20) == 0
    finally:
        memory.unlink(missing_ok=True)
        for proc in (src, dst):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
