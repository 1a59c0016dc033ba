"""User errors of the hand-off commands, each one clear line on stderr and a non-zero exit
(besides those in test_cli.py and test_handoff.py::test_cli_errors_are_one_clear_line): two
migrations at once, a destination that is not waiting (a stale socket, a file), a missing
control socket for migrate/upgrade, and --incoming paths that cannot be used."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, needs_kvm, wait_until

from intrahost.migration import faults
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


def assert_one_line_error(result: subprocess.CompletedProcess[str], *texts: str) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


#: The destination's per-message timeout in the tests that need a migration to stay active for
#: a while: its ``stall`` fault (on READY) lasts 2.5 times that, 20 s, long enough for a few CLI
#: commands on a loaded host; the source waits for the READY answer longer than that.
STALLING_DEST_TIMEOUT = "8"
PATIENT_SOURCE_TIMEOUT = str(PATIENCE)


def _source(vmm_factory: Any, sockdir: Path) -> Path:
    api = sockdir / "api.sock"
    vmm_factory(
        "run", "--memory", "32M", "--serial", "none", "--api-socket", str(api),
        name="source", wait_path=api,
    )  # fmt: skip
    return api


def test_two_migrations_at_once(
    vmm_factory: Any, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second migrate while one is under way is refused, naming the one in progress; the
    first is not disturbed."""
    with monkeypatch.context() as env:
        env.setenv("INTRAHOST_MIGRATION_TIMEOUT", PATIENT_SOURCE_TIMEOUT)
        api = _source(vmm_factory, sockdir)
    mig = sockdir / "mig.sock"
    # A destination that stalls 20 s on READY: the first migration stays active that long.
    with monkeypatch.context() as env:
        env.setenv(faults.ENV, "destination:recv-ready:stall")
        env.setenv("INTRAHOST_MIGRATION_TIMEOUT", STALLING_DEST_TIMEOUT)
        vmm_factory(
            "run", "--incoming", f"unix:{mig}", "--serial", "none",
            "--api-socket", str(sockdir / "api2.sock"), name="dest", wait_path=mig,
        )  # fmt: skip
    other = sockdir / "other.sock"  # a second destination, waiting too
    vmm_factory("run", "--incoming", f"unix:{other}", name="other", wait_path=other)
    first = subprocess.Popen(
        [sys.executable, "-m", "intrahost", "migrate", "--api-socket", str(api), f"unix:{mig}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        with QmpClient(api) as qmp:
            wait_until(
                lambda: qmp.execute("query-migrate")["status"] == "active",
                "the first migration to start",
            )
        for destination in (f"unix:{mig}", f"unix:{other}"):
            second = cli("migrate", "--api-socket", str(api), destination)
            assert_one_line_error(
                second, f"a migration to unix:{mig} is already in progress", "query-migrate"
            )
        # The first one goes on (and, the stall over, completes).
        out, err = first.communicate(timeout=2 * PATIENCE)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert "blackout:" in out


def test_a_destination_that_is_not_waiting(vmm_factory: Any, sockdir: Path) -> None:
    api = _source(vmm_factory, sockdir)
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a destination that died
    line = assert_one_line_error(
        cli("migrate", "--api-socket", str(api), f"unix:{stale}"), "migration failed"
    )
    assert "nothing listens at" in line
    afile = sockdir / "afile"
    afile.write_text("")
    assert_one_line_error(cli("migrate", "--api-socket", str(api), f"unix:{afile}"), "nothing")
    with QmpClient(api) as qmp:  # the guest stayed where it was
        assert qmp.execute("query-status")["status"] == "running"
        assert qmp.execute("query-migrate")["status"] == "failed"


def test_migrate_and_upgrade_without_a_control_socket(vmm_factory: Any, sockdir: Path) -> None:
    missing = str(sockdir / "missing.sock")
    mig = sockdir / "m.sock"
    vmm_factory("run", "--incoming", f"unix:{mig}", name="dest", wait_path=mig)
    for args in (("migrate", "--api-socket", missing, f"unix:{mig}"),
                 ("upgrade", "--api-socket", missing)):  # fmt: skip
        assert_one_line_error(cli(*args), "no control socket at")


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("missing-dir", "cannot create the migration socket"),
        ("too-long", "is too long: use at most"),
        ("a-file", "exists and is not a socket"),
        ("tcp", "unix:PATH"),
    ],
)
def test_incoming_paths_that_cannot_be_used(sockdir: Path, where: str, text: str) -> None:
    url = {
        "missing-dir": f"unix:{sockdir}/no/such/dir/m.sock",
        "too-long": f"unix:{sockdir}/{'x' * 100}.sock",
        "a-file": f"unix:{sockdir}/afile",
        "tcp": "tcp:127.0.0.1:4444",
    }[where]
    (sockdir / "afile").write_text("kept")
    assert_one_line_error(cli("run", "--incoming", url), text)
    assert (sockdir / "afile").read_text() == "kept"


def test_allow_uid_needs_incoming_and_a_uid(sockdir: Path) -> None:
    assert_one_line_error(cli("run", "--allow-uid", "1000"), "--allow-uid applies only with")
    url = f"unix:{sockdir}/m.sock"
    assert_one_line_error(cli("run", "--incoming", url, "--allow-uid", "-1"), "numeric user id")
    assert not os.path.exists(sockdir / "m.sock")


def test_status_of_a_vmm_mid_migration_still_answers(
    vmm_factory: Any, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a migration is active, control commands that change the guest are refused with
    one line naming it, and status answers."""
    with monkeypatch.context() as env:
        env.setenv("INTRAHOST_MIGRATION_TIMEOUT", PATIENT_SOURCE_TIMEOUT)
        api = _source(vmm_factory, sockdir)
    mig = sockdir / "mig.sock"
    env_fault = {
        faults.ENV: "destination:recv-ready:stall",
        "INTRAHOST_MIGRATION_TIMEOUT": STALLING_DEST_TIMEOUT,
    }
    dest = subprocess.Popen(
        [sys.executable, "-m", "intrahost", "run", "--incoming", f"unix:{mig}", "--serial",
         "none", "--api-socket", str(sockdir / "api2.sock")],
        env=os.environ | env_fault, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: mig.exists() or dest.poll() is not None, f"{mig} to appear")
        assert dest.poll() is None, "the destination exited"
        with QmpClient(api) as qmp:
            qmp.execute("migrate", uri=f"unix:{mig}")
            for command in ("pause", "resume"):
                assert_one_line_error(
                    cli(command, "--api-socket", str(api)), "is in progress; wait for it"
                )
            status = cli("status", "--api-socket", str(api))
            assert status.returncode == 0 and json.loads(status.stdout)["status"] == "running"
            wait_until(
                lambda: qmp.execute("query-migrate")["status"] != "active",
                "the migration to end",
                timeout=2 * PATIENCE,
                interval=0.05,
            )
    finally:
        dest.kill()
        dest.wait()
