"""virtio-blk on a raw image: requests through the test driver, the image lock, --disk
parsing, the machine's wiring (real /dev/kvm) and query-block."""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PATIENCE, needs_kvm
from virtio_driver import Buf, Driver

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.config import MachineConfig, MachineConfigError, parse_disk, parse_disks
from intrahost.vmm.devices.virtio.block import (
    SEG_MAX,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    DiskImage,
    DiskImageError,
    DiskLockedError,
    VirtioBlock,
)
from intrahost.vmm.devices.virtio.mmio import (
    DEVICE_NEEDS_RESET,
    VirtioMmioDevice,
)
from intrahost.vmm.memory import GuestMemory, MiB
from intrahost.vmm.persist import StateFormatError

BASE = 0xD000_0000
HDR = 0x80000
DATA = 0x100000
STATUS = 0x90000
IMAGE_SIZE = 1 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 251 for i in range(IMAGE_SIZE)))
    return path


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.create(16 * MiB) as m:
        yield m


class Disk:
    """A virtio-blk device on ``image`` with a started driver."""

    def __init__(self, mem: GuestMemory, path: Path, readonly: bool = False) -> None:
        self.block = VirtioBlock(DiskImage.open(str(path), readonly=readonly), "vda-id")
        self.dev = VirtioMmioDevice(self.block, mem, BASE, 5, "virtio-blk-test")
        self.mem = mem
        self.drv = Driver(self.dev, mem)
        self.drv.start()
        self.requests = 0

    def request(
        self, kind: int, sector: int, data: bytes = b"", read_len: int = 0, split: bool = False
    ) -> tuple[int, int, bytes]:
        """One request; returns (status, used length, data read)."""
        i = self.requests
        self.requests += 1
        hdr, out, status = HDR + 0x20 * i, DATA + 0x10000 * (i % 64), STATUS + i
        self.mem.view(hdr, 16)[:] = struct.pack("<IIQ", kind, 0, sector)
        bufs = [Buf(hdr, 8), Buf(hdr + 8, 8)] if split else [Buf(hdr, 16)]
        if data:
            self.mem.view(out, len(data))[:] = data
            bufs.append(Buf(out, len(data)))
        if read_len:
            bufs.append(Buf(out, read_len, write=True))
        bufs.append(Buf(status, 1, write=True))
        self.mem.view(status, 1)[:] = b"\xee"
        head = self.drv.add(bufs)
        self.dev.process(0)
        used = self.drv.take_used()
        assert [h for h, _ in used] == [head]
        return self.mem.view(status, 1)[0], used[0][1], bytes(self.mem.view(out, read_len))

    def close(self) -> None:
        self.dev.close()


@pytest.fixture
def disk(mem: GuestMemory, image: Path) -> Iterator[Disk]:
    d = Disk(mem, image)
    yield d
    d.close()


def expected(offset: int, n: int) -> bytes:
    return bytes(i % 251 for i in range(offset, offset + n))


# --- requests ------------------------------------------------------------------------------------


def test_config_space_and_features(disk: Disk) -> None:
    config = disk.dev.mmio_read(BASE + 0x100, 8)
    assert config == IMAGE_SIZE // 512
    assert disk.dev.mmio_read(BASE + 0x100 + 12, 4) == SEG_MAX == 254
    assert disk.dev.mmio_read(BASE + 0x100 + 20, 4) == 512
    features = disk.drv.device_features()
    assert features & VIRTIO_BLK_F_FLUSH and not features & VIRTIO_BLK_F_RO
    assert features & (1 << 2 | 1 << 6) == 1 << 2 | 1 << 6  # SEG_MAX, BLK_SIZE
    assert disk.drv.read(0x008) == 2


def test_read(disk: Disk) -> None:
    status, used, data = disk.request(VIRTIO_BLK_T_IN, 3, read_len=4096)
    assert (status, used) == (VIRTIO_BLK_S_OK, 4097)
    assert data == expected(3 * 512, 4096)


def test_write_then_read_back(disk: Disk, image: Path) -> None:
    payload = os.urandom(1024)
    status, used, _ = disk.request(VIRTIO_BLK_T_OUT, 10, data=payload)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * 512 : 10 * 512 + 1024] == payload
    status, _, data = disk.request(VIRTIO_BLK_T_IN, 10, read_len=1024, split=True)
    assert status == VIRTIO_BLK_S_OK and data == payload


def test_status_byte_in_the_data_buffer(disk: Disk, mem: GuestMemory) -> None:
    mem.view(HDR, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    head = disk.drv.add([Buf(HDR, 16), Buf(DATA, 513, write=True)])
    disk.dev.process(0)
    assert disk.drv.take_used() == [(head, 513)]
    assert bytes(mem.view(DATA, 512)) == expected(0, 512)
    assert mem.view(DATA + 512, 1)[0] == VIRTIO_BLK_S_OK


def test_flush_get_id_and_unsupported(disk: Disk) -> None:
    assert disk.request(VIRTIO_BLK_T_FLUSH, 0)[:2] == (VIRTIO_BLK_S_OK, 1)
    status, used, data = disk.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert (status, used) == (VIRTIO_BLK_S_OK, 7)
    assert data.rstrip(b"\0") == b"vda-id"
    assert disk.request(99, 0, read_len=512)[:2] == (VIRTIO_BLK_S_UNSUPP, 1)


@pytest.mark.parametrize(
    ("kind", "sector", "n"),
    [
        (VIRTIO_BLK_T_IN, IMAGE_SIZE // 512 - 1, 1024),  # runs past the end
        (VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, 512),
        (VIRTIO_BLK_T_IN, 2**63, 512),
        (VIRTIO_BLK_T_IN, 0, 100),  # not whole sectors
        (VIRTIO_BLK_T_OUT, IMAGE_SIZE // 512, 512),
    ],
)
def test_beyond_the_end_is_ioerr(disk: Disk, image: Path, kind: int, sector: int, n: int) -> None:
    before = image.read_bytes()
    if kind == VIRTIO_BLK_T_IN:
        status, used, _ = disk.request(kind, sector, read_len=n)
    else:
        status, used, _ = disk.request(kind, sector, data=b"x" * n)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    assert not disk.dev.broken
    stats = disk.block.stats
    assert stats.failed_rd_operations + stats.failed_wr_operations == 1


def test_readonly_disk(mem: GuestMemory, image: Path) -> None:
    d = Disk(mem, image, readonly=True)
    try:
        assert d.drv.device_features() & VIRTIO_BLK_F_RO
        before = image.read_bytes()
        assert d.request(VIRTIO_BLK_T_OUT, 0, data=b"y" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert image.read_bytes() == before
        assert d.request(VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
        assert d.block.query()["inserted"]["ro"] is True
    finally:
        d.close()


@pytest.mark.parametrize(
    "bufs",
    [[Buf(HDR, 16)], [Buf(HDR, 8), Buf(DATA, 1, write=True)]],
    ids=["no status byte", "short header"],
)
def test_malformed_request_breaks(disk: Disk, mem: GuestMemory, bufs: list[Buf]) -> None:
    mem.view(HDR, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    disk.drv.add(bufs)
    disk.dev.process(0)
    assert disk.dev.status & DEVICE_NEEDS_RESET
    assert disk.drv.take_used() == []


def test_counters(disk: Disk) -> None:
    disk.request(VIRTIO_BLK_T_IN, 0, read_len=4096)
    disk.request(VIRTIO_BLK_T_OUT, 0, data=b"z" * 512)
    disk.request(VIRTIO_BLK_T_FLUSH, 0)
    disk.request(VIRTIO_BLK_T_IN, IMAGE_SIZE, read_len=512)
    q = disk.block.query()
    assert q["device"] == "vda-id"
    assert q["inserted"]["file"].endswith("disk.img") and q["inserted"]["ro"] is False
    assert q["inserted"]["image"]["virtual-size"] == IMAGE_SIZE
    assert q["stats"] == {
        "rd_operations": 2,
        "wr_operations": 1,
        "flush_operations": 1,
        "rd_bytes": 4096,
        "wr_bytes": 512,
        "failed_rd_operations": 1,
        "failed_wr_operations": 0,
        "failed_flush_operations": 0,
        "invalid_operations": 0,
    }


def test_counters_travel_in_the_device_state(mem: GuestMemory, image: Path) -> None:
    """The counters are the device component's ``backend`` part: a device restored from it
    counts on from there; a state without it (an older VMM's) reads as zero."""
    from intrahost.vmm.persist import Parts

    disk = Disk(mem, image)
    disk.request(VIRTIO_BLK_T_OUT, 0, data=b"z" * 512)
    disk.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    saved = dict(disk.dev.save_parts())
    assert json.loads(saved["backend"])["wr_operations"] == 1
    disk.close()

    class Source:
        def __init__(self, parts: dict[str, bytes]) -> None:
            self.parts = {f"d/{k}" if k else "d": v for k, v in parts.items()}

        def get(self, name: str) -> bytes | None:
            return self.parts.get(name)

    other = Disk(mem, image)
    try:
        other.dev.load_parts(Parts(Source(saved), "d"))()
        assert other.block.stats.wr_operations == 1 and other.block.stats.rd_bytes == 512
        older = {k: v for k, v in saved.items() if k != "backend"}
        other.block.stats.wr_operations = 7
        other.dev.load_parts(Parts(Source(older), "d"))()
        assert other.block.stats.to_dict() == dict.fromkeys(other.block.stats.to_dict(), 0)
        partial = older | {"backend": b'{"wr_operations":5}'}
        other.dev.load_parts(Parts(Source(partial), "d"))()
        assert other.block.stats.wr_operations == 5 and other.block.stats.rd_operations == 0
        for bad in (b'{"wr_operations":-1}', b"[]", b"{"):
            with pytest.raises(StateFormatError, match="backend"):
                other.dev.load_parts(Parts(Source(older | {"backend": bad}), "d"))
    finally:
        other.close()


def test_direct_io_with_unaligned_buffers(mem: GuestMemory, image: Path) -> None:
    try:
        block = VirtioBlock(DiskImage.open(str(image), direct=True), "d")
    except DiskImageError as e:  # a file system without O_DIRECT (tmpfs)
        assert "does not support direct=on" in str(e)
        return
    dev = VirtioMmioDevice(block, mem, BASE, 5, "direct")
    try:
        drv = Driver(dev, mem)
        drv.start()
        for buf in (DATA, DATA + 3):  # aligned, then not (through the bounce buffer)
            mem.view(HDR, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2)
            drv.add([Buf(HDR, 16), Buf(buf, 1024, write=True), Buf(STATUS, 1, write=True)])
            dev.process(0)
            assert mem.view(STATUS, 1)[0] == VIRTIO_BLK_S_OK
            assert bytes(mem.view(buf, 1024)) == expected(1024, 1024)
        mem.view(DATA + 5, 512)[:] = b"w" * 512
        mem.view(HDR, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0)
        drv.add([Buf(HDR, 16), Buf(DATA + 5, 512), Buf(STATUS, 1, write=True)])
        dev.process(0)
        assert mem.view(STATUS, 1)[0] == VIRTIO_BLK_S_OK
        assert image.read_bytes()[:512] == b"w" * 512
    finally:
        dev.close()


# --- the image lock ------------------------------------------------------------------------------


def test_second_writer_is_refused(image: Path) -> None:
    first = DiskImage.open(str(image))
    try:
        with pytest.raises(DiskLockedError, match=f"disk image {image} is in use by another VMM"):
            DiskImage.open(str(image))
        with pytest.raises(DiskLockedError):
            DiskImage.open(str(image), readonly=True)
    finally:
        first.close()
    DiskImage.open(str(image)).close()  # free again


def test_readers_share(image: Path) -> None:
    a = DiskImage.open(str(image), readonly=True)
    b = DiskImage.open(str(image), readonly=True)
    try:
        with pytest.raises(DiskLockedError):
            DiskImage.open(str(image))
    finally:
        a.close()
        b.close()


def test_the_lock_travels_with_the_fd(image: Path) -> None:
    """An fd passed to another VMM carries the lock: the source can close its copy."""
    first = DiskImage.open(str(image))
    inherited = DiskImage.from_fd(os.dup(first.fd), str(image))
    first.close()
    try:
        with pytest.raises(DiskLockedError):
            DiskImage.open(str(image))
        assert inherited.size == IMAGE_SIZE
    finally:
        inherited.close()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskImageError, match=r"cannot open disk image .*missing"):
        DiskImage.open(str(tmp_path / "missing"))
    with pytest.raises(DiskImageError, match="not a regular file"):
        DiskImage.open("/dev/null")


@needs_kvm
def test_cli_refuses_a_locked_image(image: Path) -> None:
    holder = DiskImage.open(str(image))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "intrahost", "run", "--serial", "none", "--memory", "32M",
             "--disk", f"path={image}"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        holder.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"disk image {image} is in use by another VMM" in lines[0]


# --- --disk --------------------------------------------------------------------------------------


def test_disk_flag_parsing() -> None:
    d = parse_disk("path=/img,readonly=on,direct=off,id=root")
    assert (d.path, d.readonly, d.direct, d.id) == ("/img", True, False, "root")
    disks = parse_disks(["path=/a", "path=/b,id=data"])
    assert [x.id for x in disks] == ["disk0", "data"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("/img", "is not KEY=VALUE"),
        ("readonly=on", "path=IMAGE is required"),
        ("path=", "--disk needs path=IMAGE"),
        ("path=/a,readonly=yes", "readonly must be on or off"),
        ("path=/a,cache=none", "unknown key 'cache'"),
        ("path=/a,path=/b", "path is given twice"),
        ("path=/a,id=" + "x" * 21, "1 to 20 letters"),
        ("path=/a,id=a b", "1 to 20 letters"),
    ],
)
def test_disk_flag_errors(text: str, error: str) -> None:
    with pytest.raises(MachineConfigError, match=error) as info:
        parse_disk(text)
    assert "\n" not in str(info.value)


def test_config_disks() -> None:
    with pytest.raises(MachineConfigError, match="ids must differ"):
        MachineConfig(disks=parse_disks(["path=/a,id=x", "path=/b,id=x"]))
    with pytest.raises(MachineConfigError, match="at most 16"):
        MachineConfig(disks=parse_disks([f"path=/{i}" for i in range(17)]))
    config = MachineConfig(guest_args="a=1", disks=parse_disks(["path=/a", "path=/b"]))
    assert config.cmdline == (
        "cpus=1 a=1 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    )
    again = MachineConfig.from_dict(config.to_dict())
    assert again == config
    moved = MachineConfig.from_dict(
        config.to_dict() | {"disks": [d.to_dict() | {"path": "/elsewhere"} for d in config.disks]}
    )
    assert config.guest_differences(moved) == []  # the path is not guest-visible
    ro = MachineConfig(guest_args="a=1", disks=parse_disks(["path=/a,readonly=on", "path=/b"]))
    assert config.guest_differences(ro) == ["disks"]
    with pytest.raises(MachineConfigError, match="disks must be a list"):
        MachineConfig.from_dict({"disks": {}})
    with pytest.raises(MachineConfigError, match=r"disks\[0\]: missing keys \['path'\]"):
        MachineConfig.from_dict({"disks": [{}]})


def test_cli_disk_flag_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "intrahost", "run", "--disk", "path=/a,bogus=1"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "unknown key 'bogus'" in lines[0]


# --- the machine ---------------------------------------------------------------------------------


@needs_kvm
def test_machine_wires_the_disks(tmp_path: Path, image: Path) -> None:
    from intrahost.vmm.machine import Machine

    second = tmp_path / "b.img"
    second.write_bytes(bytes(4096))
    config = MachineConfig(
        memory=32 * MiB,
        serial="none",
        disks=parse_disks([f"path={image}", f"path={second},readonly=on,id=data"]),
    )
    machine = Machine.create(config)
    try:
        assert [d.size for d in machine.config.disks] == [IMAGE_SIZE, 4096]
        assert [(r.base, r.name) for r in machine.mmio.ranges] == [
            (0xD000_0000, "virtio-blk0 (disk0)"),
            (0xD000_1000, "virtio-blk1 (data)"),
        ]
        assert [d.gsi for d in machine.virtio] == [5, 6]
        assert machine.mmio.read(0xD000_1000, 4) == 0x74726976
        assert "device/virtio/1" in machine.components()
        blocks = machine.query_block()
        assert [(b["device"], b["inserted"]["ro"], b["irq"]) for b in blocks] == [
            ("disk0", False, 5),
            ("data", True, 6),
        ]
        assert machine.query()["disks"] == 2
        with pytest.raises(DiskLockedError):
            Machine.create(config)
        fds = machine.virtio[0].host_fds()
        assert set(fds) == {"image", "irq", "notify/0"}
        # The ioeventfd is registered: the same registration again is refused.
        with pytest.raises(Exception, match="EEXIST"):
            machine.vm.ioeventfd(fds["notify/0"], 0xD000_0050, 4, datamatch=0)
    finally:
        machine.close()
    Machine.create(config).close()  # the images were closed and unlocked


@needs_kvm
def test_incoming_machine_with_disks_needs_the_images(image: Path) -> None:
    from intrahost.vmm.machine import Machine, MachineError

    config = MachineConfig(memory=32 * MiB, serial="none", disks=parse_disks([f"path={image}"]))
    with GuestMemory.create(config.memory) as mem, pytest.raises(MachineError, match="disk"):
        Machine(config, mem, incoming=True)
    with GuestMemory.create(config.memory) as mem:
        inherited = DiskImage.open(str(image))  # what a hand-off passes: the open image ...
        fds = {  # ... and the device's eventfds
            "image": inherited.fd,
            "irq": os.eventfd(0, os.EFD_NONBLOCK),
            "notify/0": os.eventfd(0, os.EFD_NONBLOCK),
        }
        Machine(config, mem, incoming=True, inherited_fds=[fds]).close()
        for fd in fds.values():  # owned and closed by the machine
            with pytest.raises(OSError):
                os.fstat(fd)


@needs_kvm
def test_a_machine_started_paused_reads_no_notification(image: Path) -> None:
    """A hand-off's destination starts its devices paused while the source still serves the
    guest on the same eventfds: its I/O thread must not read a notification (a kick that is
    the source's to serve) before it runs the guest."""
    from intrahost.vmm.machine import Machine

    config = MachineConfig(memory=32 * MiB, serial="none", disks=parse_disks([f"path={image}"]))
    for _ in range(20):
        machine = Machine.create(config)
        try:
            notify = machine.virtio[0].notify_fds[0]
            os.eventfd_write(notify, 1)
            machine.start(paused=True)
            assert select.select([notify], [], [], 0.05)[0], "the paused device read the kick"
        finally:
            machine.close()


@needs_kvm
def test_query_block_on_the_control_api(tmp_path: Path, image: Path) -> None:
    from intrahost.service.runner import Vmm
    from intrahost.vmm.machine import Machine

    config = MachineConfig(memory=32 * MiB, serial="none", disks=parse_disks([f"path={image}"]))
    machine = Machine.create(config)
    vmm = Vmm(machine, str(tmp_path / "api.sock"))
    try:
        vmm.open_api()
        with QmpClient(str(tmp_path / "api.sock")) as qmp:
            (block,) = qmp.execute("query-block")
        assert block["device"] == "disk0" and block["inserted"]["file"] == str(image)
        assert block["stats"]["rd_operations"] == 0
    finally:
        if vmm.api is not None:
            vmm.api.close()
        machine.close()


@needs_kvm
def test_a_guest_without_a_virtio_driver_ignores_the_device_entries(image: Path) -> None:
    """The counter guest has no virtio driver: it skips the ``virtio_mmio.device=`` words the
    VMM appends to its command line (as Linux without the driver would) and runs as usual."""
    from intrahost.vmm.machine import Machine

    config = MachineConfig(
        memory=32 * MiB,
        guest="counter",
        guest_args="limit=1000000 progress=262144",
        serial="none",
        disks=parse_disks([f"path={image}"]),
    )
    machine = Machine.create(config)
    try:
        assert "virtio_mmio.device=4K@0xd0000000:5" in machine.config.cmdline
        machine.start()
        assert machine.wait(PATIENCE), "the counter guest did not reach its limit"
        assert machine.exit_code == 0
    finally:
        machine.close()
