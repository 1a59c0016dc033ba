"""bench/net.py in a tiny configuration, so that it can't rot: one hand-off per VMM (QEMU's too
when qemu-system-x86_64 is installed; the bench never installs it here), short windows; and
an interrupted run leaves no namespace, memory file or process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import PATIENCE

from intrahost.vmm.guests.netcheck import list_namespaces

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "net.py"
PREFIX = "intrahost-netbench"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("ip") is None,
    reason="needs root, /dev/kvm and iproute2",
)


def _ours(pid: int) -> list[str]:
    """Namespaces and memory files named after the bench process ``pid``."""
    names = [n for n in list_namespaces() if n.startswith(f"{PREFIX}-{pid}-")]
    names += [p.name for p in Path("/dev/shm").glob(f"intrahost-net-*-{pid}-*")]
    return names


def _marked(mark: str) -> list[int]:
    """Processes that inherited the environment variable MARK=``mark``: the bench's children
    (VMMs, QEMUs, echo streams) and theirs."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"INTRAHOST_NET_BENCH_TEST={mark}".encode() in environ:
                found.append(int(entry.name))
    return found


def test_a_tiny_run_measures_both_vmms_and_cleans_up(tmp_path: Path) -> None:
    argv = [sys.executable, str(BENCH), "--handoffs", "1", "--seconds", "0.3"]
    argv += ["--out", str(tmp_path), "--no-install"]
    if shutil.which("qemu-system-x86_64") is None:
        argv.append("--no-qemu")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=10 * PATIENCE)
    assert proc.returncode == 0, out + err
    report = json.loads((tmp_path / "net.json").read_text())
    assert (tmp_path / "net-blackout.png").stat().st_size > 0
    measured = [name for name, r in report["vmms"].items() if "summary" in r]
    assert "intrahost" in measured, report["vmms"]
    if "--no-qemu" not in argv:
        assert "qemu" in measured, report["vmms"]
    for name in measured:
        r = report["vmms"][name]
        (row,) = r["handoffs"]
        assert row["sent"] > 0 and row["network_blackout_ms"] > 0, row
        assert row["lost"] <= 10, row  # what a hand-off loses, not a dead network
        assert r["before"]["echo_per_s"] > 0 and r["after"]["echo_per_s"] > 0
        assert r["summary"]["n"] == 1
        for goal in ("0 lost", "network blackout <=", ">= 20000 echoes/s"):
            assert any(
                line.startswith(f"{name}: ") and goal in line and ("PASS" in line or "MISS" in line)
                for line in out.splitlines()
            ), (goal, out)
    assert "| echoes/s before / after |" in out
    assert _ours(proc.pid) == []


def test_an_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    argv = [sys.executable, str(BENCH), "--handoffs", "50", "--seconds", "0.3", "--no-qemu"]
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [*argv, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INTRAHOST_NET_BENCH_TEST": mark},
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 10 * PATIENCE
        for line in proc.stderr:  # until the hand-offs are under way
            if "hand-off 1/50" in line or time.monotonic() > deadline:
                break
        assert _ours(proc.pid), "the bench should hold a namespace and a memory file now"
        assert _marked(mark), "the bench should have started a VMM"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=2 * PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _ours(proc.pid) == []
    assert _marked(mark) == []
