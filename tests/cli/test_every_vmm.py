"""Every VMM on a host (issue 12, §5): control sockets in the runtime directory, ``--name``,
``intrahost list`` (guest uptime kept across upgrades) and ``intrahost upgrade --all``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm

from intrahost.service.qmp_client import QmpClient

pytestmark = needs_kvm


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def rundir(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own runtime directory (VMMs of other tests are not listed)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sockdir))
    return sockdir / "intrahost"


def start(vmm_factory: Any, rundir: Path, name: str, *flags: str) -> Any:
    return vmm_factory(
        "run", "--memory", "32M", "--serial", "none", "--name", name, *flags,
        name=name, wait_path=rundir / f"{name}.sock",
    )  # fmt: skip


def listing() -> dict[str, Any]:
    result = cli("list", "--output", "json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_a_vmm_without_a_socket_gets_one_in_the_runtime_directory(
    vmm_factory: Any, rundir: Path
) -> None:
    proc = vmm_factory("run", "--memory", "16M", "--serial", "none", name="anonymous")
    path = rundir / f"vm-{proc.pid}.sock"
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.alive() and time.monotonic() < deadline, proc.output()
        time.sleep(0.02)
    assert (rundir.stat().st_mode & 0o777) == 0o700
    status = cli("status", "--name", f"vm-{proc.pid}", "--output", "json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "running"
    assert cli("stop", "--name", f"vm-{proc.pid}").returncode == 0
    assert proc.wait(10) == 0
    assert not path.exists()


def test_names_are_checked_and_found(rundir: Path) -> None:
    result = cli("run", "--name", "../escape")
    assert result.returncode == 2 and "invalid VMM name '../escape'" in result.stderr
    missing = cli("status", "--name", "nobody")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        f"intrahost: error: no VMM named nobody in {rundir} ('intrahost list' shows the VMMs there)"
    )
    both = cli("status", "--name", "a", "--api-socket", "/x")
    assert both.returncode != 0 and "either --api-socket or --name" in both.stderr


def test_list_shows_each_vmm_and_the_guest_uptime_survives_upgrades(
    vmm_factory: Any, rundir: Path
) -> None:
    start(vmm_factory, rundir, "alpha")
    start(vmm_factory, rundir, "beta", "--vcpus", "2")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(rundir / "gone.sock"))
    stale.close()  # its VMM was killed

    document = listing()
    vmms = {v["name"]: v for v in document["vmms"]}
    assert set(vmms) == {"alpha", "beta"}
    assert vmms["beta"]["vcpus"] == 2 and vmms["alpha"]["memory"] == 32 << 20
    for v in vmms.values():
        assert v["status"] == "running" and v["guest"] == "counter"
        assert v["version"] not in ("", "?") and isinstance(v["pid"], int)
        assert v["guest-uptime"] >= 0 and v["vmm-uptime"] >= 0
    assert document["stale"] == [str(rundir / "gone.sock")]
    text = cli("list")
    assert text.returncode == 0
    header, *rows = text.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "PID", "VERSION"]
    assert [r.split()[0] for r in rows[:2]] == ["alpha", "beta"]
    assert "stale socket" in text.stdout

    time.sleep(1.2)  # the guest's uptime grows past a whole second before the upgrade
    before = {v["name"]: v for v in listing()["vmms"]}["alpha"]
    assert cli("upgrade", "--name", "alpha").returncode == 0
    after = {v["name"]: v for v in listing()["vmms"]}["alpha"]
    assert after["pid"] != before["pid"]
    assert after["guest-uptime"] >= before["guest-uptime"] >= 1.0
    assert after["vmm-uptime"] < before["guest-uptime"]

    cleaned = cli("list", "--clean", "--output", "json")
    assert json.loads(cleaned.stdout)["removed"] == [str(rundir / "gone.sock")]
    assert not (rundir / "gone.sock").exists()


def test_upgrade_all_in_batches(vmm_factory: Any, rundir: Path) -> None:
    for name in ("one", "two", "three"):
        start(vmm_factory, rundir, name)
    pids = {v["name"]: v["pid"] for v in listing()["vmms"]}
    result = cli("upgrade", "--all", "--parallel", "2", "--output", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["upgraded"], summary["failed"], summary["skipped"]) == (3, 0, 0)
    after = {v["name"]: v["pid"] for v in listing()["vmms"]}
    assert set(after) == set(pids) and not set(after.values()) & set(pids.values())
    text = cli("upgrade", "--all")
    assert text.returncode == 0, text.stderr
    assert text.stdout.split()[:6] == ["NAME", "RESULT", "OLD", "PID", "NEW", "PID"]
    assert text.stdout.count(" upgraded ") == 3


def test_upgrade_all_stops_at_the_first_failure(vmm_factory: Any, rundir: Path) -> None:
    """Names sort a, b, c; b has other memory, so the batch (a, b) upgrades a, refuses b
    (its guest stays on its VMM); c, in the next batch, is not started."""
    start(vmm_factory, rundir, "a")
    start(vmm_factory, rundir, "b", "--memory", "48M")
    start(vmm_factory, rundir, "c")
    pids = {v["name"]: v["pid"] for v in listing()["vmms"]}
    result = cli("upgrade", "--all", "--parallel", "2", "--output", "json", "--", "--memory", "32M")
    assert result.returncode == 1
    rows = {r["name"]: r for r in json.loads(result.stdout)["vmms"]}
    assert {n: r["result"] for n, r in rows.items()} == {
        "a": "upgraded",
        "b": "failed",
        "c": "skipped",
    }
    assert "--memory" in rows["b"]["error"]
    after = {v["name"]: v for v in listing()["vmms"]}
    assert after["a"]["pid"] != pids["a"]
    assert after["b"]["pid"] == pids["b"] and after["b"]["status"] == "running"
    assert after["c"]["pid"] == pids["c"]
    with QmpClient(rundir / "b.sock") as qmp:
        assert qmp.execute("query-status")["status"] == "running"
