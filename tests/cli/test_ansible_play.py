"""The fleet upgrade play of docs/operations.md, run with ansible-core against two local
"hosts" (connection local), each with its own runtime directory of VMMs: every VMM is
upgraded; then, with a new release that does not exist, the play stops at the first host
and leaves the second untouched. It takes about 30 s: it runs with `make test-ops` (pytest
-m ops), not `make test`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "docs" / "operations.md"


def ansible_playbook() -> str | None:
    beside = Path(sys.executable).parent / "ansible-playbook"
    return str(beside) if beside.exists() else shutil.which("ansible-playbook")


pytestmark = [
    pytest.mark.ops,
    needs_kvm,
    pytest.mark.skipif(ansible_playbook() is None, reason="needs ansible-core (test extras)"),
]


def the_play() -> str:
    """The play, as docs/operations.md shows it."""
    blocks = re.findall(r"```yaml\n(.*?)```", PLAYBOOK.read_text(), re.S)
    assert len(blocks) == 1, "docs/operations.md should show one YAML play"
    return str(blocks[0])


def pids(rundir: Path) -> dict[str, int]:
    from intrahost.service.qmp_client import QmpClient

    found = {}
    for sock in sorted(rundir.glob("*.sock")):
        with QmpClient(sock) as qmp:
            found[sock.stem] = int(qmp.execute("query-vm")["pid"])
    return found


def test_the_fleet_play_upgrades_every_vmm_and_stops_at_a_failure(
    vmm_factory: Any, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = {"host1": ("a", "b"), "host2": ("c",)}
    inventory = ["[vmm_hosts]"]
    for host, names in hosts.items():
        home = sockdir / host
        home.mkdir()
        # The host's installed intrahost: this checkout, with the host's runtime directory.
        wrapper = home / "intrahost.sh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"export XDG_RUNTIME_DIR={home}\n"
            f"export PYTHONPATH={os.environ.get('PYTHONPATH', '')}\n"
            f'exec {sys.executable} -m intrahost "$@"\n'
        )
        wrapper.chmod(0o755)
        inventory.append(f"{host} ansible_connection=local intrahost={wrapper}")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(home))
        for name in names:
            vmm_factory(
                "run", "--memory", "16M", "--serial", "none", "--name", name,
                name=name, wait_path=home / "intrahost" / f"{name}.sock",
            )  # fmt: skip
    inventory += ["[vmm_hosts:vars]", "ansible_python_interpreter={{ ansible_playbook_python }}"]
    (sockdir / "hosts.ini").write_text("\n".join(inventory) + "\n")
    (sockdir / "upgrade.yml").write_text(the_play())
    env = os.environ | {
        "ANSIBLE_HOME": str(sockdir / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(sockdir / "ansible" / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    }

    def play(new_release: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(ansible_playbook()), "-i", str(sockdir / "hosts.ini"),
                str(sockdir / "upgrade.yml"), "-e", f"intrahost_new={new_release}",
            ],
            capture_output=True, text=True, timeout=300, env=env, cwd=sockdir,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    rundirs = {host: sockdir / host / "intrahost" for host in hosts}
    before = {host: pids(d) for host, d in rundirs.items()}
    result = play(sockdir / "host1" / "intrahost.sh")  # "the new release": this checkout
    assert result.returncode == 0, result.stdout + result.stderr
    after = {host: pids(d) for host, d in rundirs.items()}
    for host, names in hosts.items():
        assert set(after[host]) == set(names)
        assert not set(after[host].values()) & set(before[host].values()), (host, result.stdout)
    assert re.search(r"host1\s*:\s*ok=2\s+changed=1", result.stdout), result.stdout
    assert re.search(r"host2\s*:\s*ok=2\s+changed=1", result.stdout), result.stdout

    failing = play("/nonexistent/intrahost")
    assert failing.returncode != 0, failing.stdout
    assert re.search(r"host1\s*:.*failed=1", failing.stdout), failing.stdout
    assert not re.search(r"host2\s*:\s*ok=[1-9]", failing.stdout), failing.stdout
    # Every guest is still on the VMM it had: host1's upgrades failed, host2 was not touched.
    assert {host: pids(d) for host, d in rundirs.items()} == after
