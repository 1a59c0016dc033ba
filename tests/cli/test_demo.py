"""``make demo``'s network part (``python -m intrahost.demo net``) as a new user runs it: the
net guest answers ping and a UDP echo stream through three upgrades with nothing lost, in a
namespace the demo creates and always removes — also on Ctrl-C — and a machine that can't
run it is told so in one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from netsupport import needs_netns
from support import PATIENCE, needs_kvm, wait_until

pytestmark = [needs_kvm, needs_netns]

needs_ping = pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils)")
needs_tun = pytest.mark.skipif(
    not os.access("/dev/net/tun", os.R_OK | os.W_OK), reason="needs /dev/net/tun"
)


def _demo_namespaces(pid: int) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"intrahost-demo-{pid}-")]


def _namespace_pids(name: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in listed.stdout.split()]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _start_demo(**options: Any) -> subprocess.Popen[str]:
    """``python -m intrahost.demo net``, its output piped (text); ``options`` go to Popen."""
    return subprocess.Popen(
        [sys.executable, "-m", "intrahost.demo", "net"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        **options,
    )


@needs_ping
@needs_tun
def test_the_net_guest_loses_nothing_through_three_upgrades() -> None:
    proc = _start_demo()
    try:
        out, err = proc.communicate(timeout=10 * PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    assert out.rstrip().endswith("OK: 0% loss through three upgrades"), out
    # Three upgrades, each to a new VMM.
    pids = [int(p) for p in re.findall(r"== upgrade \d: now VMM pid (\d+)", out)]
    first = int(re.search(r"runs in VMM pid (\d+)", out)[1])  # type: ignore[index]
    assert len(set([first, *pids])) == 4, out
    # ping's own statistics: every probe answered, none twice.
    counts = re.search(r"(\d+) packets transmitted, (\d+) received, 0% packet loss", out)
    assert counts is not None, out
    assert int(counts[1]) == int(counts[2]) >= 2500
    assert "duplicates" not in out
    # The echo stream's: thousands of datagrams, none lost or duplicated.
    stream = re.search(r"(\d+) sent \(\d+/s\), (\d+) received \(\d+/s\), 0 lost, 0 duplicated", out)
    assert stream is not None, out
    assert int(stream[1]) == int(stream[2]) > 1000
    assert "network blackout:" in out
    assert _demo_namespaces(proc.pid) == []


@needs_ping
@needs_tun
def test_ctrl_c_removes_the_namespace_and_its_processes() -> None:
    proc = _start_demo(
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        (name,) = wait_until(lambda: _demo_namespaces(proc.pid), "the demo's namespace")

        def upgraded() -> int | None:
            found = re.search(r"== upgrade 1: now VMM pid (\d+)", "".join(lines))
            return int(found[1]) if found else None

        # The guest now runs on a VMM the upgrade started: not the demo's child, and not in
        # its process group, so Ctrl-C does not reach it.
        vmm = wait_until(upgraded, "the first upgrade")
        inside = _namespace_pids(name)
        assert vmm in inside
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        proc.wait(PATIENCE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(PATIENCE)
    assert proc.returncode != 0, "".join(lines)
    assert _demo_namespaces(proc.pid) == []
    left = [pid for pid in inside if not _gone(pid)]
    assert left == [], f"still running after Ctrl-C: {left}"


def test_a_machine_without_ping_is_told_in_one_line(tmp_path: Path) -> None:
    ip = shutil.which("ip")
    assert ip is not None
    (tmp_path / "ip").symlink_to(ip)  # ip, and no ping, on the PATH
    result = subprocess.run(
        [sys.executable, "-m", "intrahost.demo", "net"],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        env=os.environ | {"PATH": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "== skipping the network part of the demo: `ping` is not installed (iputils-ping)"
    ]
    assert result.stderr == ""
