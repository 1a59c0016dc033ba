"""``intrahost upgrade`` keeps what the operator set (issue 12, §2): the new VMM inherits the
running VMM's console, log level and destination, name and socket; flags after ``--``
override them; a flag that can't change across a hand-off is refused before anything
starts, naming it; the new VMM's own error reaches the user as it said it; a pty console
keeps its pty."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm

from intrahost.service.qmp_client import QmpClient

pytestmark = needs_kvm


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line(result: subprocess.CompletedProcess[str], *texts: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def settings(api: Path) -> dict[str, Any]:
    with QmpClient(api) as qmp:
        result: dict[str, Any] = qmp.execute("query-settings")
        return result


def pid_of(api: Path) -> int:
    with QmpClient(api) as qmp:
        return int(qmp.execute("query-vm")["pid"])


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def source(vmm_factory: Any, sockdir: Path) -> Iterator[tuple[Any, Path]]:
    api = sockdir / "api.sock"
    proc = vmm_factory(
        "run", "--memory", "32M", "--guest-args", "progress=1048576",
        "--serial", f"file:{sockdir / 'serial.log'}", "--name", "keeper",
        "--log-file", str(sockdir / "keeper.log"), "--api-socket", str(api),
        wait_path=api,
    )  # fmt: skip
    yield proc, api
    cli("stop", "--api-socket", str(api))


def test_the_new_vmm_inherits_console_logs_name_and_socket(
    source: tuple[Any, Path], sockdir: Path
) -> None:
    """Before: the new VMM started with defaults: its console went to /dev/null (the serial
    file stopped growing) and its log nowhere."""
    _proc, api = source
    before = settings(api)
    assert before["log-level"] == "info" and before["name"] == "keeper"
    serial = sockdir / "serial.log"
    wait_for(lambda: serial.exists() and serial.stat().st_size > 0, "no console output")
    old_pid = pid_of(api)

    result = cli("upgrade", "--api-socket", str(api))
    assert result.returncode == 0, result.stderr
    new_pid = pid_of(api)
    assert new_pid != old_pid
    after = settings(api)
    for key in ("log-level", "log-file", "name", "api-socket", "allow-uid"):
        assert after[key] == before[key], key
    assert after["config"]["serial"] == before["config"]["serial"]
    # The console goes on into the same file, now written by the new VMM.
    size = serial.stat().st_size
    wait_for(lambda: serial.stat().st_size > size + 100, "the console stopped after the upgrade")
    # And its log into the same log file.
    log = sockdir / "keeper.log"
    wait_for(lambda: f"intrahost[{new_pid}]" in log.read_text(), "the new VMM logs elsewhere")


def test_flags_after_the_double_dash_override_the_inherited_ones(
    source: tuple[Any, Path], sockdir: Path
) -> None:
    """Before: ``-- --log-level info`` killed the new VMM (it did not know the option)."""
    _proc, api = source
    other = sockdir / "serial-2.log"
    result = cli(
        "upgrade", "--api-socket", str(api), "--",
        "--log-level", "debug", "--serial", f"file:{other}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = settings(api)
    assert after["log-level"] == "debug"
    assert after["config"]["serial"] == f"file:{other}"
    assert after["name"] == "keeper"
    wait_for(lambda: other.exists() and other.stat().st_size > 0, "no console in the new file")


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (("--api-socket", "{dir}/other.sock"), "--api-socket"),
        (("--incoming", "unix:{dir}/in.sock"), "--incoming"),
        (("--memory-path", "/dev/shm/ih-other"), "--memory-path"),
        (("--name", "someone-else"), "--name"),
        (("--memory", "64M"), "--memory"),
        (("--guest", "hello"), "--guest"),
    ],
    ids=["api-socket", "incoming", "memory-path", "name", "memory", "guest"],
)
def test_flags_that_cannot_change_are_refused_before_anything_starts(
    source: tuple[Any, Path], sockdir: Path, flags: tuple[str, ...], name: str
) -> None:
    """Before: ``--api-socket`` moved the guest, then failed with the old socket gone;
    ``--memory-path`` was silently ignored."""
    _proc, api = source
    old_pid = pid_of(api)
    args = [f.format(dir=sockdir) for f in flags]
    line = one_line(cli("upgrade", "--api-socket", str(api), "--", *args), name)
    assert "keeps running on the old VMM" in line
    assert pid_of(api) == old_pid
    with QmpClient(api) as qmp:
        assert qmp.execute("query-migrate")["status"] == "none"
        assert qmp.execute("query-status")["status"] == "running"
    assert not (sockdir / "other.sock").exists()


def test_the_new_vmms_own_error_reaches_the_user(source: tuple[Any, Path]) -> None:
    """Before: only "the new VMM exited with status 2 before the hand-off"."""
    _proc, api = source
    old_pid = pid_of(api)
    result = cli("upgrade", "--api-socket", str(api), "--", "--bogus")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("intrahost: error: the new VMM")
    as_json = cli("upgrade", "--api-socket", str(api), "--output", "json", "--", "--bogus")
    error = json.loads(as_json.stdout)["error"]
    assert "unrecognized arguments: --bogus" in error["desc"]
    assert pid_of(api) == old_pid


def test_a_missing_exec_is_one_line(source: tuple[Any, Path]) -> None:
    """Before: a FileNotFoundError traceback."""
    _proc, api = source
    one_line(cli("upgrade", "--api-socket", str(api), "--exec", "/missing/intrahost"), "/missing")
    one_line(cli("upgrade", "--api-socket", str(api), "--exec", "'unbalanced"), "--exec")


def _read_until(fd: int, text: bytes, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} did not arrive; got {seen[-200:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            seen += os.read(fd, 4096)
    return seen


def test_a_pty_console_keeps_its_pty(vmm_factory: Any, sockdir: Path) -> None:
    """Before: the new VMM opened another pty, and nobody knew its path."""
    api = sockdir / "api.sock"
    proc = vmm_factory(
        "run", "--memory", "32M", "--guest-args", "progress=1048576", "--serial", "pty",
        "--api-socket", str(api), wait_path=api,
    )  # fmt: skip
    said = "intrahost: serial console on "
    wait_for(lambda: said in proc.output(), "run did not say the pty")
    pty = proc.output().split(said)[1].split()[0]
    status = json.loads(cli("status", "--api-socket", str(api)).stdout)
    assert status["vm"]["console"] == f"pty:{pty}"
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    try:
        _read_until(fd, b"count=")
        result = cli("upgrade", "--api-socket", str(api))
        assert result.returncode == 0, result.stderr
        assert f"serial console on {pty}" in result.stdout
        new_pid = pid_of(api)
        assert new_pid != proc.pid
        assert json.loads(cli("status", "--api-socket", str(api)).stdout)["vm"]["console"] == (
            f"pty:{pty}"
        )
        # The guest's output goes on arriving on the same terminal, from the new VMM.
        wait_for(lambda: not proc.alive(), "the old VMM did not exit")
        _read_until(fd, b"count=")
    finally:
        os.close(fd)
        cli("stop", "--api-socket", str(api))


@pytest.mark.parametrize("prefault", [True, False], ids=["default", "no-prefault"])
def test_upgrade_prefaults_the_new_vmm_unless_told_not_to(
    source: tuple[Any, Path], sockdir: Path, prefault: bool
) -> None:
    """``upgrade`` starts the new VMM with ``--prefault`` (it maps the guest's resident pages
    before the pause: a shorter brownout after the hand-off); ``--no-prefault`` leaves it
    out."""
    _proc, api = source
    result = cli("upgrade", "--api-socket", str(api), *([] if prefault else ["--no-prefault"]))
    assert result.returncode == 0, result.stderr
    with QmpClient(api) as qmp:
        incoming = qmp.execute("query-migrate")
    assert incoming["direction"] == "incoming", incoming
    assert ("prefault_us" in incoming["blackout"]) is prefault, incoming
