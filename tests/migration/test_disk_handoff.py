"""The disk guest across hand-offs between real VMM processes (real /dev/kvm, real image
files): it keeps writing; afterwards every write it saw complete is on the image exactly as
written, its reads verified, and no request completed twice — the device's counters (carried
in the state) agree with the guest's and with the used ring."""

from __future__ import annotations

import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import VmmProcess, needs_kvm

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.diskcheck import GuestView, check_image
from intrahost.vmm.guests.layout import DiskState, DiskStatus

pytestmark = needs_kvm

#: Seconds to wait for a condition on this loaded 2-CPU host before failing.
PATIENCE = 60.0
IMAGE_SIZE = 64 << 20
#: The used ring's index in the disk guest's memory (layout: used ring at queue + 0x2000).
USED_IDX_ADDR = layout.DISK_QUEUE_ADDR + 0x2000 + 2


def wait_until(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/ih-disk-{uuid.uuid4().hex[:12]}")
    yield path
    path.unlink(missing_ok=True)


class GuestMemoryFile:
    """The guest's memory file, mapped by the test: the disk guest's status page."""

    def __init__(self, path: Path) -> None:
        wait_until(path.exists, f"{path}")
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def status(self) -> DiskStatus | None:
        try:
            return layout.read_disk_status(self.map)
        except layout.GuestStatusMissing:
            return None

    def writes(self) -> int:
        status = self.status()
        return status.writes_completed if status is not None else 0

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.map, USED_IDX_ADDR)[0])

    def close(self) -> None:
        self.map.close()


def start_disk_guest(
    vmm_factory: Any, sockdir: Path, image: Path, shm: Path, guest_args: str = ""
) -> tuple[VmmProcess, Path, GuestMemoryFile]:
    api = sockdir / "api.sock"
    proc = vmm_factory(
        "run", "--memory", "64M", "--guest", "disk",
        "--guest-args", f"progress=1000000000 {guest_args}".strip(),
        "--disk", f"path={image}", "--memory-path", str(shm),
        "--serial", f"file:{sockdir / 'serial-0.log'}", "--api-socket", str(api),
        name="source", wait_path=api,
    )  # fmt: skip
    mem = GuestMemoryFile(shm)
    wait_until(lambda: mem.writes() >= 500, "the disk guest's first writes")
    return proc, api, mem


def upgrade(api: Path) -> str:
    result = cli("upgrade", "--api-socket", str(api))
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_at_rest(api: Path, image: Path, mem: GuestMemoryFile) -> dict[str, int]:
    """Pause the guest (its device drains), then: every write it saw complete is on the image,
    it saw no verify failure, I/O error or duplicate completion, and the device's counters
    over the guest's whole life agree with the used ring and with the guest's."""
    with QmpClient(api) as qmp:
        qmp.execute("stop")
        (disk,) = qmp.execute("query-block")
    status = mem.status()
    assert status is not None and status.state == DiskState.RUNNING, status
    assert (status.verify_failures, status.io_errors, status.duplicates) == (0, 0, 0), status
    stats = disk["stats"]
    device_done = stats["wr_operations"] + stats["rd_operations"] + stats["flush_operations"]
    assert stats["invalid_operations"] == 0 and stats["failed_wr_operations"] == 0
    # Every completion the device counted is published in the used ring, once.
    assert device_done % 65536 == mem.used_idx(), (stats, mem.used_idx())
    # The guest reaped all but those still in the ring (at most one per request in flight).
    reaped = status.writes_completed + status.reads_completed + status.flushes
    assert 0 <= device_done - reaped <= status.inflight, (stats, status)
    assert status.writes_completed <= stats["wr_operations"] <= status.writes_submitted
    assert status.reads_completed <= stats["rd_operations"]
    assert status.flushes <= stats["flush_operations"] <= status.flushes + 1
    report = check_image(image, GuestView.from_memory(mem.map))
    assert report.ok, report.summary()
    assert report.verdicts is not None and report.verdicts["ok"] > 0
    return dict(stats)


def test_one_handoff_keeps_the_disk_guest_writing(
    vmm_factory: Any, sockdir: Path, image: Path, shm_file: Path
) -> None:
    source, api, mem = start_disk_guest(vmm_factory, sockdir, image, shm_file)
    try:
        before = mem.writes()
        out = upgrade(api)
        assert re.search(r"pause \d+ µs \(drain \d+ µs\)", out), out
        assert source.wait(30) == 0, source.output()
        wait_until(lambda: mem.writes() >= before + 2000, "writes on the new VMM")
        stats = check_at_rest(api, image, mem)
        assert stats["wr_operations"] >= before + 2000  # counted since the guest started
        with QmpClient(api) as qmp:
            (disk,) = qmp.execute("query-block")
            assert disk["inserted"]["file"] == str(image)
            qmp.execute("quit")
    finally:
        mem.close()


def test_fifty_handoffs_lose_no_write_and_complete_none_twice(
    vmm_factory: Any, sockdir: Path, image: Path, shm_file: Path
) -> None:
    source, api, mem = start_disk_guest(vmm_factory, sockdir, image, shm_file, "inflight=16")
    try:
        for i in range(50):
            before = mem.writes()
            upgrade(api)
            if i == 0:
                assert source.wait(30) == 0, source.output()
            # The guest writes on every new VMM before the next hand-off.
            wait_until(lambda b=before: mem.writes() > b + 50, f"writes after hand-off {i + 1}")  # type: ignore[misc]
        check_at_rest(api, image, mem)
        with QmpClient(api) as qmp:
            qmp.execute("quit")
    finally:
        mem.close()


def test_the_image_path_is_never_reopened(
    vmm_factory: Any, sockdir: Path, image: Path, shm_file: Path
) -> None:
    """The image file is replaced on disk before the hand-off: the new VMM goes on writing
    to the open image it inherited, never to the file now at that path."""
    _source, api, mem = start_disk_guest(vmm_factory, sockdir, image, shm_file)
    try:
        moved = image.with_suffix(".moved")
        os.rename(image, moved)
        with image.open("wb") as impostor:
            impostor.truncate(IMAGE_SIZE)
        before = mem.writes()
        upgrade(api)
        wait_until(lambda: mem.writes() >= before + 1000, "writes on the new VMM")
        check_at_rest(api, moved, mem)
        assert image.read_bytes() == bytes(IMAGE_SIZE), "the new VMM wrote to the new file"
        with QmpClient(api) as qmp:
            qmp.execute("quit")
    finally:
        mem.close()


def test_a_vmm_killed_after_a_handoff_leaves_every_acknowledged_write(
    vmm_factory: Any, sockdir: Path, image: Path, shm_file: Path
) -> None:
    """kill -9 of the VMM that took the guest over, while the guest writes: the image holds
    every write the guest saw complete (the guest's view read from its memory file)."""
    _source, api, mem = start_disk_guest(vmm_factory, sockdir, image, shm_file)
    try:
        upgrade(api)
        before = mem.writes()
        wait_until(lambda: mem.writes() >= before + 1000, "writes on the new VMM")
        with QmpClient(api) as qmp:
            pid = int(qmp.execute("query-vm")["pid"])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), "the killed VMM to go")
        status = mem.status()
        assert status is not None and (status.verify_failures, status.duplicates) == (0, 0)
        report = check_image(image, GuestView.from_memory(mem.map))
        assert report.ok, report.summary()
    finally:
        mem.close()
