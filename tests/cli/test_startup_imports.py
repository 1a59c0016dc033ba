"""What the command imports at start-up: only what the command in hand needs.

A new VMM's imports are most of the time from its start to the moment it can take a guest
(``intrahost upgrade`` waits for exactly that), and the CLI's own start-up is in every
upgrade's wall time. Each test runs a fresh interpreter, imports what that path imports, and
checks that modules only other paths need were not pulled in.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Only an SEV guest needs the model platform; only booting a built-in guest needs its build and
#: loader; only guest-check reads disk images.
NOT_FOR_A_PLAIN_VMM = (
    "intrahost.sevmodel",
    "intrahost.sevmodel.client",
    "intrahost.vmm.guests.build",
    "intrahost.vmm.guests.loader",
    "intrahost.vmm.guests.diskcheck",
    "concurrent.futures",
    "tempfile",
    "hashlib",
)

#: The CLI starts a new VMM and talks to the old one; it needs neither KVM nor a machine.
NOT_FOR_THE_UPGRADE_CLI = (
    "intrahost.kvm",
    "intrahost.vmm.machine",
    "intrahost.vmm.vcpu",
    "intrahost.migration.receiver",
    "intrahost.migration.sender",
    "intrahost.service.runner",
)


def imported_after(code: str) -> set[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return set(modules) - {"json", "json.decoder", "json.scanner", "json.encoder"}


def test_a_waiting_vmm_imports_no_sev_platform_guest_build_or_disk_check() -> None:
    # Everything `run --incoming` imports before it waits, and what it imports to serve.
    loaded = imported_after(
        "import intrahost.cli as cli\n"
        "args = cli.build_parser().parse_args(['run', '--incoming', 'unix:/nonexistent'])\n"
        "from intrahost.service import logs, registry, runner\n"
        "from intrahost.migration import faults\n"
        "from intrahost.vmm import vcpu, machine\n"
    )
    assert "intrahost.service.runner" in loaded and "intrahost.vmm.machine" in loaded
    assert sorted(loaded & set(NOT_FOR_A_PLAIN_VMM)) == []


def test_the_upgrade_command_imports_no_machine() -> None:
    loaded = imported_after(
        "import intrahost.cli as cli\n"
        "args = cli.build_parser().parse_args(['upgrade', '--api-socket', '/nonexistent'])\n"
        "cli._target(args)\n"
        "cli.parse_new_flags(['--log-level', 'info'])\n"
        "from intrahost.service import logs, qmp_client, spawn, notify\n"
    )
    assert "intrahost.service.spawn" in loaded
    assert sorted(loaded & set(NOT_FOR_THE_UPGRADE_CLI)) == []
