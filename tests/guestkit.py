"""What the C guests' tests (``tests/vmm/test_disk_guest.py``, ``test_net_guest.py``) share:
their ABI headers read as numbers, a private build cache, and the QEMU microvm they run on.

A test module takes the cache fixture by importing it under its own name (``from guestkit
import isolated_guest_cache as isolated_guest_cache``): pytest finds fixtures among a
module's names, and it is autouse.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from intrahost.vmm.guests import build
from intrahost.vmm.guests.build import build_guest
from intrahost.vmm.guests.layout import ExitCode, ReportTag

MiB = 1 << 20
QEMU = shutil.which("qemu-system-x86_64")
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_qemu = pytest.mark.skipif(
    QEMU is None or not HAVE_KVM,
    reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86) and access to /dev/kvm",
)
#: microvm's first virtio-mmio transport; the guest gets it only from the command line.
MICROVM_DEVICE = "virtio_mmio.device=512@0xfeb00e00:12"
GUEST_RAM = 64 * MiB
#: QEMU's isa-debug-exit at the guests' exit port: QEMU exits with (code << 1) | 1.
EXIT_DEVICE = ("-device", "isa-debug-exit,iobase=0x50c,iosize=1")


@pytest.fixture(autouse=True)
def isolated_guest_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guests build into the session's cache, never into the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "guest-cache"))


def header_defines(header: str) -> dict[str, int]:
    """The numeric ``#define``\\ s a C guest sees: cguest.h's (the ports) and its ABI header's."""
    defines: dict[str, int] = {}
    for name in ("cguest.h", header):
        text = (build.SOURCE_DIR / name).read_text()
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        found = re.findall(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+\w*|\d+)\s*$", text, re.M)
        for key, value in found:
            assert key not in defines, f"{key} is defined in cguest.h and in {header}"
            defines[key] = int(value.rstrip("uUlL"), 0)
    return defines


def check_status_abi(
    h: dict[str, int],
    fields: Sequence[str],
    size: int,
    states: type[enum.IntEnum],
    state_prefix: str,
) -> tuple[dict[str, int], dict[str, int]]:
    """Check what every C guest's ABI header has against layout.py: the status page's u64
    field offsets (``ST_<FIELD>``, in the order of ``fields``) and ``ST_SIZE``, its states
    (``<state_prefix>_<NAME>``), and that its exit codes and report tags are layout's. The
    exit codes and the tags (by name, without ``EXIT_``/``TAG_``), for the guest's own checks."""
    offsets = {name: value for name, value in h.items() if name.startswith("ST_")}
    assert offsets.pop("ST_SIZE") == size
    assert offsets == {f"ST_{field.upper()}": 8 * i for i, field in enumerate(fields)}
    assert 8 * len(fields) <= size
    for state in states:
        assert h[f"{state_prefix}_{state.name}"] == state.value
    exits = {name[5:]: value for name, value in h.items() if name.startswith("EXIT_")}
    assert exits == {name: ExitCode[name].value for name in exits}
    tags = {name[4:]: value for name, value in h.items() if name.startswith("TAG_")}
    assert tags == {name: ReportTag[name].value for name in tags}
    return exits, tags


def microvm_command(guest: str, append: str, serial: Path, *devices: str) -> list[str]:
    """QEMU's microvm (virtio-mmio version 2, no ACPI) running built-in guest ``guest`` with
    command line ``append``, its UART in the file ``serial``, and ``devices`` (options)."""
    assert QEMU is not None
    return [
        QEMU, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(GUEST_RAM // MiB), "-nodefaults", "-no-user-config", "-display", "none",
        "-global", "virtio-mmio.force-legacy=false", "-serial", f"file:{serial}",
        "-kernel", str(build_guest(guest)), "-append", append, *devices,
    ]  # fmt: skip


class Qmp:
    """Just enough QMP to dump guest memory and stop QEMU: connected once QEMU's socket at
    ``path`` appears."""

    def __init__(self, path: Path) -> None:
        wait_until(path.exists, "QEMU's QMP socket")
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        self.file = sock.makefile("rw")
        sock.close()  # the file keeps the connection
        json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            assert "error" not in reply, f"QMP {command}: {reply['error']}"
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def running_qemu(command: Sequence[str], qmp_path: Path) -> Iterator[Qmp]:
    """QEMU started with ``command`` (which serves QMP at ``qmp_path``), connected; killed
    at the end."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        qmp = Qmp(qmp_path)
        try:
            yield qmp
        finally:
            qmp.close()
    finally:
        process.kill()
        process.wait()
