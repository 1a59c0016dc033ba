"""contrib/systemd/intrahost@.service under a real systemd: start (Type=notify: active once
the VMM said READY=1, with the VMM as main pid), reload (= ``intrahost upgrade``: the unit
stays active, its main pid moves to the new VMM, the guest's counter goes on), stop (SIGTERM:
a clean exit, the control socket removed).

systemd runs as PID 1 of its own pid and mount namespaces, with a private /tmp (systemd
empties /tmp at boot) and only sockets.target started; the test drives it with
``nsenter ... systemctl``. It is skipped where that cannot run (not root, no systemd, no
unshare, no /dev/kvm)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HAVE_KVM

import intrahost
from intrahost.service.qmp_client import QmpClient, QmpConnectionError

SYSTEMD = Path("/usr/lib/systemd/systemd")
UNIT = Path(__file__).parents[2] / "contrib" / "systemd" / "intrahost@.service"
BOOT_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (pid and mount namespaces)"),
    pytest.mark.skipif(not SYSTEMD.exists(), reason=f"no systemd at {SYSTEMD}"),
    pytest.mark.skipif(
        not (shutil.which("unshare") and shutil.which("nsenter")), reason="needs unshare, nsenter"
    ),
    pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm (read/write)"),
]


class Systemd:
    """systemd as PID 1 of new pid and mount namespaces."""

    def __init__(self) -> None:
        script = (
            "mount -t tmpfs tmpfs /tmp && exec env container=intrahost-test "
            f"{SYSTEMD} --system --unit=sockets.target"
        )
        self.helper = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation",
             "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.pid = self._child_of(self.helper.pid)

    @staticmethod
    def _child_of(pid: int) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except FileNotFoundError:
                break
            if children:
                return int(children[0])
            time.sleep(0.02)
        raise RuntimeError("the namespace's init did not start")

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *args],
            capture_output=True, text=True, input=input, timeout=120,
        )  # fmt: skip

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside: str) -> Path:
        """A path of the namespace's mount view, as seen from outside."""
        return Path(f"/proc/{self.pid}/root{inside}")

    def wait_running(self) -> str:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.systemctl("is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        return state

    def stop(self) -> None:
        self.systemctl("poweroff", "--no-block")
        try:
            self.helper.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.helper.wait(10)


@pytest.fixture(scope="module")
def systemd() -> Iterator[Systemd]:
    instance = Systemd()
    try:
        state = instance.wait_running()
        if state not in ("running", "degraded"):
            pytest.skip(f"systemd did not come up in a namespace here (state {state!r})")
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(f"/var/tmp/intrahost-systemd-test-{os.getpid()}", ignore_errors=True)


def _visible_in_the_namespace() -> tuple[str, Path]:
    """A Python and a directory holding this checkout's ``intrahost`` that the namespace's
    systemd can see. Its /tmp is a tmpfs of its own (and emptied at its boot), so a checkout
    under /tmp (a CI clone) is copied to /var/tmp and run by the real interpreter (intrahost
    needs nothing beyond the standard library at run time)."""
    checkout = Path(intrahost.__file__).parents[1]
    if not checkout.is_relative_to("/tmp"):
        return sys.executable, checkout
    copy = Path(f"/var/tmp/intrahost-systemd-test-{os.getpid()}")
    if not copy.exists():
        shutil.copytree(
            checkout / "intrahost", copy / "intrahost", ignore=shutil.ignore_patterns("__pycache__")
        )
    return os.path.realpath(sys.executable), copy


def _unit_for_this_checkout(shm: Path, extra_args: str = "") -> str:
    """The shipped template, run from this checkout's Python with a small counter guest."""
    text = UNIT.read_text()
    python, checkout = _visible_in_the_namespace()
    text = text.replace("/usr/local/bin/intrahost", f"{python} -m intrahost")
    help_text = subprocess.run(
        [sys.executable, "-m", "intrahost", "run", "--help"], capture_output=True, text=True
    ).stdout
    if "--name" not in help_text:  # (until `run --name` exists)
        text = text.replace(" --name %i", "")
    args = f"--memory 32M --memory-path {shm} --guest-args progress=16777216 --serial none"
    args = f"{args} {extra_args}".strip()
    extra = (
        f"Environment=PYTHONPATH={checkout}\n"
        f'Environment="INTRAHOST_ARGS={args}"\n'
        "Environment=INTRAHOST_MIGRATION_TIMEOUT=10\n"
    )
    return text.replace("[Service]\n", "[Service]\n" + extra, 1)


def _counter(api: Path) -> tuple[int, int]:
    """(the answering VMM's pid as it sees itself, the guest's counter)."""
    with QmpClient(api) as qmp:
        info = qmp.execute("query-vm")
    return int(info["pid"]), sum(c["count"] for c in info.get("counter", []))


def _advancing(api: Path) -> int:
    _pid, first = _counter(api)
    deadline = time.monotonic() + 20
    while (now := _counter(api))[1] <= first:
        assert time.monotonic() < deadline, "the guest's counter does not advance"
        time.sleep(0.05)
    return now[1]


def test_start_reload_stop(systemd: Systemd) -> None:
    name = f"t{os.getpid()}"
    unit = f"intrahost@{name}.service"
    shm = Path(f"/dev/shm/ih-systemd-{name}")
    _install(systemd, shm)
    api = systemd.path(f"/run/intrahost/{name}.sock")
    try:
        started = systemd.systemctl("start", unit)
        assert started.returncode == 0, (started.stderr, _journal(systemd, unit))
        props = systemd.show(unit, "ActiveState", "MainPID", "StatusText")
        assert props["ActiveState"] == "active", props
        main_pid = int(props["MainPID"])
        assert _counter(api)[0] == main_pid  # the unit's main process is the VMM
        assert "running guest counter" in props["StatusText"]
        before = _advancing(api)

        reloaded = systemd.systemctl("reload", unit)
        assert reloaded.returncode == 0, (reloaded.stderr, _journal(systemd, unit))
        deadline = time.monotonic() + 30
        while True:
            props = systemd.show(unit, "ActiveState", "MainPID")
            try:
                answering = _counter(api)[0]
            except QmpConnectionError:
                answering = 0
            if int(props["MainPID"]) != main_pid and answering == int(props["MainPID"]):
                break
            assert time.monotonic() < deadline, (props, _journal(systemd, unit))
            time.sleep(0.1)
        assert props["ActiveState"] == "active", (props, _journal(systemd, unit))
        # The old VMM exits after the hand-off; the unit stays active with the new main pid.
        deadline = time.monotonic() + 20
        while systemd.run("kill", "-0", str(main_pid)).returncode == 0:
            assert time.monotonic() < deadline, "the old VMM did not exit"
            time.sleep(0.1)
        props = systemd.show(unit, "ActiveState", "MainPID")
        assert props["ActiveState"] == "active", (props, _journal(systemd, unit))
        assert _advancing(api) > before  # the same guest, still counting

        stopped = systemd.systemctl("stop", unit)
        assert stopped.returncode == 0, stopped.stderr
        props = systemd.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props["ActiveState"] == "inactive", (props, _journal(systemd, unit))
        assert props["Result"] == "success", (props, _journal(systemd, unit))
        assert not api.exists()
    finally:
        systemd.systemctl("stop", unit)
        shm.unlink(missing_ok=True)


def test_stop_is_a_clean_shutdown_logged_to_the_journal(systemd: Systemd) -> None:
    """SIGTERM from ``systemctl stop``: a log line, exit 0; the VMM's lines reach journald
    with their priority (the ``<N>`` prefix, since stderr is the journal stream)."""
    name = f"j{os.getpid()}"
    unit = f"intrahost@{name}.service"
    shm = Path(f"/dev/shm/ih-systemd-{name}")
    _install(systemd, shm, "--log-level info")
    try:
        assert systemd.systemctl("start", unit).returncode == 0, _journal(systemd, unit)
        assert systemd.systemctl("stop", unit).returncode == 0
        props = systemd.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        out = systemd.run("journalctl", "--no-pager", "-o", "json", "-u", unit).stdout
        entries = [json.loads(line) for line in out.splitlines()]
        by_message = {str(e.get("MESSAGE")): e for e in entries}
        line = "intrahost.service.runner: shutting the guest down (SIGTERM)"
        assert line in by_message, sorted(by_message)
        assert by_message[line]["PRIORITY"] == "6"  # info, from the <6> prefix
        assert not any(str(m).startswith("<") for m in by_message)
    finally:
        systemd.systemctl("stop", unit)
        shm.unlink(missing_ok=True)


def _install(systemd: Systemd, shm: Path, extra_args: str = "") -> None:
    installed = systemd.run(
        "sh", "-c", "cat > /run/systemd/system/intrahost@.service",
        input=_unit_for_this_checkout(shm, extra_args),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert systemd.systemctl("daemon-reload").returncode == 0


def _journal(systemd: Systemd, unit: str) -> str:
    return systemd.run("journalctl", "--no-pager", "-u", unit).stdout
