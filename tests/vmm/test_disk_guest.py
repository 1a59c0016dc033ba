"""The disk guest: its ABI (disk.h against layout.py), the image verifier, its probe, the
``guest-check`` command, and the guest itself on QEMU's microvm virtio-blk device (skipped
when QEMU or /dev/kvm is not available)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestkit
import pytest
from guestkit import (
    EXIT_DEVICE,
    GUEST_RAM,
    MICROVM_DEVICE,
    Qmp,
    check_status_abi,
    header_defines,
    needs_qemu,
    running_qemu,
)
from guestkit import isolated_guest_cache as isolated_guest_cache  # autouse

from intrahost.cli import main as cli_main
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.diskcheck import (
    BlockKind,
    GuestView,
    GuestViewInvalid,
    check_image,
    expected_block,
    parse_block,
)
from intrahost.vmm.guests.layout import DiskState, ExitCode
from intrahost.vmm.guests.probe import DiskProbe

MiB = 1 << 20
GEN = 0x1234567
BS = layout.DISK_BLOCK_SIZE


# --- ABI -----------------------------------------------------------------------------------------


def test_disk_h_matches_layout() -> None:
    h = header_defines("disk.h")
    pairs = {
        "UART_DATA": layout.UART_BASE,
        "UART_LSR": layout.UART_LSR,
        "DEBUG_TAG": layout.DEBUG_PORT_TAG,
        "DEBUG_VALUE_LO": layout.DEBUG_PORT_VALUE_LO,
        "DEBUG_VALUE_HI": layout.DEBUG_PORT_VALUE_HI,
        "DISK_STATUS_ADDR": layout.DISK_STATUS_ADDR,
        "DISK_QUEUE_ADDR": layout.DISK_QUEUE_ADDR,
        "DISK_REQUESTS_ADDR": layout.DISK_REQUESTS_ADDR,
        "DISK_REQUEST_SIZE": layout.DISK_REQUEST_SIZE,
        "DISK_BUFFERS_ADDR": layout.DISK_BUFFERS_ADDR,
        "DISK_SEQ_TABLE_ADDR": layout.DISK_SEQ_TABLE_ADDR,
        "STATUS_MAGIC": layout.DISK_STATUS_MAGIC_U64,
        "ST_SIZE": layout.DISK_STATUS_SIZE,
        "BLOCK_SIZE": layout.DISK_BLOCK_SIZE,
        "BLOCK_MAGIC": layout.DISK_BLOCK_MAGIC_U64,
        "BLK_MAGIC": layout.BLK_MAGIC,
        "BLK_GENERATION": layout.BLK_GENERATION,
        "BLK_BLOCK": layout.BLK_BLOCK,
        "BLK_SEQ": layout.BLK_SEQ,
        "BLK_BLOCKS": layout.BLK_BLOCKS,
        "BLK_CRC": layout.BLK_CRC,
        "BLK_HEADER_SIZE": layout.BLK_HEADER_SIZE,
        "PAYLOAD_MUL_SEQ": layout.PAYLOAD_MUL_SEQ,
        "PAYLOAD_MUL_WORD": layout.PAYLOAD_MUL_WORD,
        "DEFAULT_INFLIGHT": layout.DISK_DEFAULT_INFLIGHT,
        "DEFAULT_FLUSH": layout.DISK_DEFAULT_FLUSH,
        "DEFAULT_VERIFY": layout.DISK_DEFAULT_VERIFY,
        "DEFAULT_PROGRESS": layout.DISK_DEFAULT_PROGRESS,
        "BENCH_NONE": layout.DISK_BENCH_NONE,
        "BENCH_RANDWRITE": layout.DISK_BENCH_RANDWRITE,
        "BENCH_RANDREAD": layout.DISK_BENCH_RANDREAD,
    }
    assert {name: h[name] for name in pairs} == pairs
    exits, tags = check_status_abi(
        h, layout.DISK_STATUS_FIELDS, layout.DISK_STATUS_SIZE, DiskState, "DISK_STATE"
    )
    assert set(exits) >= {"NO_DEVICE", "DEVICE_ERROR", "IO_ERROR", "VERIFY_FAILED"}
    assert len(tags) == 5


# --- the verifier --------------------------------------------------------------------------------


def write_image(path: Path, blocks: list[bytes | None], size_blocks: int | None = None) -> None:
    """An image whose block i is blocks[i] (None: zeros), ``size_blocks`` long."""
    total = size_blocks or len(blocks)
    data = bytearray(total * BS)
    for i, block in enumerate(blocks):
        if block is not None:
            data[i * BS : (i + 1) * BS] = block
    path.write_bytes(data)


def round_robin(blocks: int, writes: int) -> tuple[list[bytes | None], list[int]]:
    """What ``writes`` completed writes over ``blocks`` blocks leave: image and last_seq."""
    last = [0] * blocks
    for seq in range(1, writes + 1):
        last[(seq - 1) % blocks] = seq
    image: list[bytes | None] = [
        expected_block(GEN, b, s, blocks) if s else None for b, s in enumerate(last)
    ]
    return image, last


def test_parse_block() -> None:
    good = expected_block(GEN, 3, 11, 8)
    header = parse_block(3, good)
    assert (header.kind, header.generation, header.block, header.seq, header.blocks) == (
        BlockKind.VALID, GEN, 3, 11, 8,
    )  # fmt: skip
    torn = good[:2048] + expected_block(GEN, 3, 19, 8)[2048:]
    assert parse_block(3, torn).kind is BlockKind.CORRUPT
    assert parse_block(0, bytes(BS)).kind is BlockKind.EMPTY
    assert parse_block(0, b"\1" * BS).kind is BlockKind.FOREIGN


def test_check_every_completed_write_present(tmp_path: Path) -> None:
    image, last = round_robin(8, 21)
    write_image(tmp_path / "img", image, 10)  # two blocks more than the guest used
    view = GuestView(GEN, 8, 21, last)
    report = check_image(tmp_path / "img", view)
    assert report.ok
    assert report.image_blocks == 10
    assert report.kinds == {"empty": 2, "valid": 8, "corrupt": 0, "foreign": 0}
    assert report.generations == {GEN: {"blocks": 8, "min_seq": 14, "max_seq": 21}}
    assert report.verdicts == {"ok": 8, "newer": 0, "torn-in-flight": 0, "unwritten": 0, "lost": 0}
    assert "OK: every write the guest saw complete is on the image" in report.summary()


def test_check_allows_what_was_in_flight(tmp_path: Path) -> None:
    image, last = round_robin(8, 16)
    # Writes 17-19 were submitted; 17 landed, 18 is torn, 19 did not reach the disk yet.
    image[0] = expected_block(GEN, 0, 17, 8)
    image[1] = (image[1] or b"")[:512] + expected_block(GEN, 1, 18, 8)[512:]
    write_image(tmp_path / "img", image)
    report = check_image(tmp_path / "img", GuestView(GEN, 8, 19, last))
    assert report.ok, report.summary()
    assert report.verdicts is not None
    assert (report.verdicts["ok"], report.verdicts["newer"], report.verdicts["torn-in-flight"]) == (
        6, 1, 1,
    )  # fmt: skip
    assert report.corrupt == [1]


def test_check_finds_lost_and_torn_writes(tmp_path: Path) -> None:
    image, last = round_robin(8, 12)
    image[2] = expected_block(GEN, 2, 3, 8)  # stale: the guest saw 11 complete there
    image[4] = None  # never reached the disk
    image[5] = (image[5] or b"")[:4000] + bytes(96)  # torn, with no write in flight
    image[6] = expected_block(GEN + 1, 6, 7, 8)  # another run's block
    write_image(tmp_path / "img", image)
    report = check_image(tmp_path / "img", GuestView(GEN, 8, 12, last))
    assert not report.ok
    assert report.lost == [
        {"block": 2, "expected": 11, "found": "sequence 3"},
        {"block": 4, "expected": 5, "found": "zeros"},
        {"block": 5, "expected": 6, "found": "a corrupt block"},
        {
            "block": 6,
            "expected": 7,
            "found": f"generation {GEN + 1:#x} block 6 sequence 7 of 8 blocks",
        },
    ]
    summary = report.summary()
    assert "lost write: block 2 should hold sequence 11, holds sequence 3" in summary
    assert summary.endswith("FAILED")


def test_check_without_a_view(tmp_path: Path) -> None:
    image, _ = round_robin(4, 6)
    image[3] = expected_block(GEN, 1, 2, 4)  # a block at the wrong place
    write_image(tmp_path / "img", image)
    report = check_image(tmp_path / "img")
    assert report.misplaced == [3]
    assert report.verdicts is None
    assert not report.ok


def test_unwritten_blocks_are_not_lost(tmp_path: Path) -> None:
    image, last = round_robin(8, 3)
    write_image(tmp_path / "img", image)
    report = check_image(tmp_path / "img", GuestView(GEN, 8, 3, last))
    assert report.ok
    assert report.verdicts is not None and report.verdicts["unwritten"] == 5


@pytest.mark.parametrize(
    ("view", "message"),
    [
        ({"blocks": 4, "writes_submitted": 9, "last_seq": [1, 2]}, "2 sequence numbers for 4"),
        ({"blocks": 4, "writes_submitted": 9, "last_seq": [2, 0, 0, 0]}, "block 0 last .* 2"),
        ({"blocks": 2, "writes_submitted": 1, "last_seq": [1, 2]}, "block 1 last .* 2"),
        ({"blocks": 2}, "a guest view is a JSON object"),
    ],
    ids=["length", "wrong-block", "not-submitted", "missing"],
)  # fmt: skip
def test_bad_guest_views(tmp_path: Path, view: dict[str, Any], message: str) -> None:
    (tmp_path / "view.json").write_text(json.dumps({"generation": 1, **view}))
    with pytest.raises(GuestViewInvalid, match=message):
        GuestView.load(tmp_path / "view.json")


def test_view_larger_than_the_image(tmp_path: Path) -> None:
    write_image(tmp_path / "img", [None] * 2)
    with pytest.raises(GuestViewInvalid, match="only 2: is it the right image"):
        check_image(tmp_path / "img", GuestView(GEN, 4, 0, [0] * 4))


def guest_memory(blocks: int, last: list[int], submitted: int, state: DiskState) -> bytearray:
    """Guest RAM as the disk guest leaves it."""
    mem = bytearray(layout.DISK_SEQ_TABLE_ADDR + 8 * blocks + MiB)
    values = dict.fromkeys(layout.DISK_STATUS_FIELDS, 0)
    values.update(
        magic=layout.DISK_STATUS_MAGIC_U64, state=state, blocks=blocks, generation=GEN,
        writes_submitted=submitted, writes_completed=sum(1 for s in last if s),
        max_completed=max(last), durable=3, reads_completed=7, device_base=0xD0000000,
    )  # fmt: skip
    struct.pack_into(f"<{len(values)}Q", mem, layout.DISK_STATUS_ADDR, *values.values())
    struct.pack_into(f"<{blocks}Q", mem, layout.DISK_SEQ_TABLE_ADDR, *last)
    return mem


def test_probe_and_view_from_memory(tmp_path: Path) -> None:
    _, last = round_robin(8, 13)
    mem = guest_memory(8, last, 13, DiskState.RUNNING)
    probe = DiskProbe(mem)
    progress = probe.progress()
    assert progress is not None
    assert progress["state"] == "running"
    assert (progress["writes-completed"], progress["last-seq"], progress["durable-seq"]) == (
        8,
        13,
        3,
    )
    assert probe.view() == GuestView(GEN, 8, 13, tuple(last))
    assert DiskProbe(bytearray(8 * MiB)).progress() is None

    (tmp_path / "memory").write_bytes(mem)
    assert GuestView.load(tmp_path / "memory") == probe.view()
    (tmp_path / "view.json").write_text(json.dumps(probe.view().to_json()))
    assert GuestView.load(tmp_path / "view.json") == probe.view()

    starting = guest_memory(8, last, 13, DiskState.STARTING)
    with pytest.raises(GuestViewInvalid, match="not started its workload"):
        DiskProbe(starting).view()
    with pytest.raises(GuestViewInvalid, match="no disk guest status"):
        GuestView.from_memory(bytearray(8 * MiB))


def test_guest_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, last = round_robin(8, 13)
    write_image(tmp_path / "img", image)
    (tmp_path / "view.json").write_text(json.dumps(GuestView(GEN, 8, 13, last).to_json()))
    assert cli_main(["guest-check", "disk", str(tmp_path / "img"), "--status-from",
                     str(tmp_path / "view.json"), "--output", "json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["verdicts"]["ok"] == 8

    image[0] = None
    write_image(tmp_path / "img", image)
    assert cli_main(["guest-check", "disk", str(tmp_path / "img"), "--status-from",
                     str(tmp_path / "view.json")]) == 1  # fmt: skip
    assert "lost write: block 0 should hold sequence 9, holds zeros" in capsys.readouterr().out

    assert cli_main(["guest-check", "disk", str(tmp_path / "nope")]) == 1
    assert "cannot read the disk image" in capsys.readouterr().err


# --- the guest on QEMU microvm's virtio-blk ------------------------------------------------------

QEMU_TIMEOUT = 30.0
DONE_LINE = re.compile(r"disk: done writes=(\d+) reads=(\d+) verify_failures=(\d+) .* tsc=(\d+)")


def microvm_command(tmp_path: Path, append: str, image: Path, *extra: str) -> list[str]:
    return guestkit.microvm_command(
        "disk", append, tmp_path / "serial.log",
        "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
        *EXIT_DEVICE, *extra,
    )  # fmt: skip


def run_microvm(tmp_path: Path, append: str, image: Path) -> tuple[int, str]:
    process = subprocess.Popen(
        microvm_command(tmp_path, append, image),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the guest did not end in time:\n{(tmp_path / 'serial.log').read_text()}")
    assert process.returncode & 1, f"QEMU ended without the guest's exit code: {stderr!r}"
    return process.returncode >> 1, (tmp_path / "serial.log").read_text()


@pytest.fixture
def disk_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as file:
        file.truncate(4 * MiB)
    return image


@needs_qemu
def test_microvm_disk_runs_to_its_limit(tmp_path: Path, disk_image: Path) -> None:
    limit = 20000
    code, serial = run_microvm(
        tmp_path, f"cpus=1 {MICROVM_DEVICE} limit={limit} inflight=16 progress=8192", disk_image
    )
    assert code == ExitCode.OK, serial
    lines = serial.splitlines()
    assert lines[0].startswith("disk: device at 0xfeb00e00 capacity=8192 blocks=1024 ")
    assert " inflight=16 flush=64 verify=1 " in lines[0]
    assert len([line for line in lines if line.startswith("disk: writes=")]) == 2
    done = DONE_LINE.match(lines[-1])
    assert done, serial
    assert (int(done[1]), int(done[3])) == (limit, 0)
    assert int(done[2]) > limit // 2  # verify=1: about one read-back per write
    # The final flush made everything durable; the image holds the newest 1024 writes.
    report = check_image(disk_image)
    assert report.ok
    generation = int(re.search(r"generation=(0x[0-9a-f]+)", lines[0])[1], 16)  # type: ignore[index]
    assert report.generations == {
        generation: {"blocks": 1024, "min_seq": limit - 1023, "max_seq": limit}
    }


@needs_qemu
def test_microvm_disk_takes_the_first_block_device(tmp_path: Path, disk_image: Path) -> None:
    """Entries in the VMM's form (4K@0xd0000000:5) parse; one without a device is skipped."""
    append = f"virtio_mmio.device=4K@0xd0000000:5 {MICROVM_DEVICE}:0 limit=100 blocks=16"
    code, serial = run_microvm(tmp_path, append, disk_image)
    assert code == ExitCode.OK, serial
    lines = serial.splitlines()
    assert lines[0] == "disk: no virtio-mmio device at 0xd0000000"
    assert lines[1].startswith("disk: device at 0xfeb00e00 capacity=8192 blocks=16 ")
    assert lines[-1].startswith("disk: done writes=100 ")


@needs_qemu
@pytest.mark.parametrize(
    ("append", "code", "message"),
    [
        ("limit=1", ExitCode.NO_DEVICE, "no virtio_mmio.device= entry"),
        ("virtio_mmio.device=512@0xfeb01000:13", ExitCode.NO_DEVICE, "no virtio-blk device"),
        (f"{MICROVM_DEVICE} inflight=86", ExitCode.BAD_CMDLINE, "bad value .*: inflight=86"),
        (f"{MICROVM_DEVICE} speed=1", ExitCode.BAD_CMDLINE, "unknown command line key"),
        (f"{MICROVM_DEVICE} blocks=2000", ExitCode.BAD_CMDLINE, "blocks= is larger than the disk"),
    ],
    ids=["no-entry", "no-device", "inflight", "unknown", "blocks"],
)
def test_microvm_disk_errors(
    tmp_path: Path, disk_image: Path, append: str, code: ExitCode, message: str
) -> None:
    got, serial = run_microvm(tmp_path, append, disk_image)
    assert got == code, serial
    assert re.search(f"disk: error: {message}", serial), serial


@pytest.fixture
def running_disk_guest(tmp_path: Path, disk_image: Path) -> Iterator[tuple[Qmp, Path]]:
    qmp_path = tmp_path / "qmp.sock"
    command = microvm_command(
        tmp_path, f"{MICROVM_DEVICE} inflight=16 flush=32 verify=2 progress=4096", disk_image,
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    )  # fmt: skip
    with running_qemu(command, qmp_path) as qmp:
        yield qmp, tmp_path


@needs_qemu
def test_microvm_disk_every_completed_write_is_on_the_image(
    running_disk_guest: tuple[Qmp, Path], disk_image: Path
) -> None:
    """Stop a running guest (QEMU finishes its requests), dump its memory, check the image."""
    qmp, tmp_path = running_disk_guest
    serial = tmp_path / "serial.log"
    deadline = time.monotonic() + QEMU_TIMEOUT
    while serial.read_text().count("disk: writes=") < 3:  # several rounds over the 1024 blocks
        assert time.monotonic() < deadline, serial.read_text()
        time.sleep(0.05)
    qmp.execute("stop")
    dump = tmp_path / "memory.bin"
    qmp.execute("pmemsave", val=0, size=GUEST_RAM, filename=str(dump))
    qmp.execute("quit")

    memory = dump.read_bytes()
    status = DiskProbe(memory).status()
    assert status is not None
    assert status.state == DiskState.RUNNING
    assert status.writes_completed >= 3 * 4096
    assert (status.verify_failures, status.io_errors) == (0, 0)
    assert status.reads_completed > 0 and status.flushes > 0
    assert 0 < status.durable <= status.max_completed <= status.writes_submitted
    view = DiskProbe(memory).view()
    report = check_image(disk_image, view)
    assert report.ok, report.summary()
    assert report.verdicts is not None and report.verdicts["ok"] > 0

    # The same check from the command line, with the view in a JSON file.
    (tmp_path / "view.json").write_text(json.dumps(view.to_json()))
    assert cli_main(["guest-check", "disk", str(disk_image), "--status-from",
                     str(tmp_path / "view.json")]) == 0  # fmt: skip
