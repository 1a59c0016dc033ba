"""What the VMM does with the files the user names (as README.md documents): a
``--serial file:PATH`` console appends, and a ``--memory-path`` file is kept at ``stop``."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs_kvm, wait_for_path

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout

pytestmark = needs_kvm


def intrahost(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def wait_counting(api: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    with QmpClient(api) as qmp:
        while True:
            counter = qmp.execute("query-vm").get("counter", [])
            if counter and counter[0]["count"]:
                return int(counter[0]["count"])
            assert time.monotonic() < deadline, "the guest did not start counting"
            time.sleep(0.05)


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/ih-test-{uuid.uuid4().hex[:12]}")
    yield path
    path.unlink(missing_ok=True)


def test_a_file_console_appends(sockdir: Path) -> None:
    console = sockdir / "console.log"
    console.write_text("kept\n")
    for _ in range(2):
        done = intrahost(
            "run", "--memory", "16M", "--guest", "hello", "--serial", f"file:{console}"
        )
        assert done.returncode == 0, done.stderr
    assert console.read_text() == "kept\n" + 2 * layout.HELLO_TEXT


def test_a_memory_file_is_kept_at_stop_with_the_guests_memory(
    sockdir: Path, shm_file: Path
) -> None:
    api = sockdir / "api.sock"
    args = ["run", "--memory", "16M", "--guest", "counter", "--memory-path", str(shm_file)]
    vmm = subprocess.Popen(
        [sys.executable, "-m", "intrahost", *args, "--serial", "none", "--api-socket", str(api)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(api)
        counted = wait_counting(api)
        done = intrahost("stop", "--api-socket", str(api))
        assert done.returncode == 0, done.stderr
        assert vmm.wait(20) == 0
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
    assert shm_file.stat().st_size == 16 << 20
    fd = os.open(shm_file, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as memory:
            assert layout.read_status(memory).slots[0].counter >= counted
    finally:
        os.close(fd)
