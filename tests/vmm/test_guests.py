"""The built-in guests: their build, the multiboot loader, the layout readers, and the guests
themselves booted by QEMU (skipped when QEMU or /dev/kvm is not available)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guestkit import Qmp, running_qemu
from support import PATIENCE

from intrahost.vmm.guests import build, layout
from intrahost.vmm.guests.build import GuestBuildError, build_guest, list_guests
from intrahost.vmm.guests.layout import (
    ExitCode,
    GuestLayoutError,
    GuestMemoryCorrupt,
    GuestStatusMissing,
    ReportTag,
)
from intrahost.vmm.guests.loader import (
    MULTIBOOT_BOOT_MAGIC,
    BootInfo,
    GuestLoadError,
    boot_cpu_state,
    load_guest,
    read_guest_image,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(guest_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test builds into one cache of this module, never into the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(guest_cache))


# --- build ---------------------------------------------------------------------------------------


def test_list_guests() -> None:
    assert list_guests() == ["counter", "disk", "hello", "net"]


@pytest.mark.parametrize("name", ["hello", "counter", "disk"])
def test_build_produces_multiboot_elf32(name: str, guest_cache: Path) -> None:
    path = build_guest(name)
    assert path.parent.parent == guest_cache / "intrahost" / "guests"
    assert path.name == f"{name}.elf"
    image = path.read_bytes()
    assert image[:5] == b"\x7fELF\x01"  # ELF32
    assert struct.unpack_from("<H", image, 18)[0] == 3  # EM_386
    offset = image.find(struct.pack("<I", 0x1BADB002))
    assert 0 <= offset < 8192
    assert offset % 4 == 0
    # The loader accepts it; its segments end below the status page.
    ram = bytearray(16 * MiB)
    info = load_guest(image, ram, "")
    assert info.eax == MULTIBOOT_BOOT_MAGIC
    assert layout.IMAGE_BASE <= info.entry < layout.STATUS_ADDR


def test_build_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_guest("hello")
    mtime = first.stat().st_mtime_ns

    def no_build(command: list[str], cwd: Path, guest: str | None) -> str:
        raise AssertionError(f"rebuilt although cached: {command}")

    monkeypatch.setattr(build, "_run", no_build)
    second = build_guest("hello")
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = []
    for attempt in ("one", "two"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / attempt))
        images.append(build_guest("counter").read_bytes())
    assert images[0] == images[1]


def test_build_key_follows_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = build.build_key()
    sources = _copy_sources(tmp_path)
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    assert build.build_key() == before
    with (sources / "hello.S").open("a") as file:
        file.write("/* a change */\n")
    assert build.build_key() != before


def test_unknown_guest() -> None:
    with pytest.raises(GuestBuildError, match=r"no built-in guest 'nope'.*counter, disk, hello"):
        build_guest("nope")


def test_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_versions", {})
    with pytest.raises(GuestBuildError, match=r"GNU 'as' is not on PATH.*binutils"):
        build_guest("hello")


def test_c_guests_need_gcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gcc the assembly guests still build; the C guests name the missing compiler."""
    for tool in ("as", "ld"):
        (tmp_path / tool).symlink_to(shutil.which(tool) or tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_versions", {})
    assert build_guest("counter").is_file()
    with pytest.raises(GuestBuildError, match=r"GNU 'gcc' is not on PATH.*apt-get install gcc"):
        build_guest("disk")


def test_c_guest_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = []
    for attempt in ("one", "two"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / attempt))
        images.append(build_guest("disk").read_bytes())
    assert images[0] == images[1]
    assert images[0][:5] == b"\x7fELF\x01"  # converted to ELF32 for multiboot loaders


def test_compiler_error_is_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _copy_sources(tmp_path / "src")
    with (sources / "disk.c").open("a") as file:
        file.write("int broken(void) { return undeclared_name; }\n")
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    with pytest.raises(GuestBuildError, match=r"(?s)building guest 'disk'.*undeclared_name"):
        build_guest("disk")


def test_assembler_error_is_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _copy_sources(tmp_path / "src")
    with (sources / "hello.S").open("a") as file:
        file.write("    not_an_instruction %eax\n")
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    with pytest.raises(GuestBuildError) as caught:
        build_guest("hello")
    message = str(caught.value)
    assert "building guest 'hello'" in message
    assert "not_an_instruction" in message  # the assembler's own diagnostic
    assert "exit status" in message


def _copy_sources(target: Path) -> Path:
    shutil.copytree(build.SOURCE_DIR, target, dirs_exist_ok=True)
    return target


# --- loader: synthetic images --------------------------------------------------------------------

RAM = 16 * MiB


def make_elf(
    segments: list[tuple[int, bytes, int]] | None = None,
    *,
    entry: int | None = None,
    mb_flags: int = 0x2,
    mb_offset: int | None = None,
    mb_checksum_delta: int = 0,
    elf_class: int = 1,
    machine: int = 3,
    e_type: int = 2,
    extra_phdrs: list[tuple[int, ...]] | None = None,
) -> bytes:
    """A minimal ELF32 executable: ``segments`` are (paddr, data, memsz). The multiboot
    header goes at ``mb_offset`` (default: right after the program headers)."""
    if segments is None:
        segments = [(0x100000, b"\xf4" * 64, 0x1000)]
    phdrs: list[tuple[int, ...]] = [
        (1, 0, paddr, paddr, len(data), memsz, 7, 0x1000) for paddr, data, memsz in segments
    ]
    phdrs += extra_phdrs or []
    phoff = 52
    header_end = phoff + 32 * len(phdrs)
    mb_at = header_end if mb_offset is None else mb_offset
    data_at = max(header_end, mb_at + 12)
    data_at = (data_at + 15) & ~15
    body = bytearray(data_at)
    fixed = []
    for (_, data, _), phdr in zip(segments, phdrs, strict=False):
        fixed.append((phdr[0], len(body), *phdr[2:]))
        body += data
    fixed += phdrs[len(segments) :]
    if entry is None:
        entry = segments[0][0] if segments else 0x100000
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    struct.pack_into(
        "<16sHHIIIIIHHHHHH", body, 0, ident, e_type, machine, 1, entry, phoff, 0, 0, 52, 32,
        len(fixed), 40, 0, 0,
    )  # fmt: skip
    for index, phdr in enumerate(fixed):
        struct.pack_into("<IIIIIIII", body, phoff + 32 * index, *phdr)
    checksum = (-(0x1BADB002 + mb_flags) + mb_checksum_delta) & 0xFFFFFFFF
    if mb_at + 12 <= len(body):
        struct.pack_into("<III", body, mb_at, 0x1BADB002, mb_flags, checksum)
    else:
        body[mb_at:] = struct.pack("<III", 0x1BADB002, mb_flags, checksum)
    return bytes(body)


def mbi_fields(ram: bytearray) -> dict[str, int]:
    names = [
        "flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
        "mods_addr", "syms0", "syms1", "syms2", "syms3", "mmap_length", "mmap_addr",
        "drives_length", "drives_addr", "config_table", "boot_loader_name",
    ]  # fmt: skip
    return dict(zip(names, struct.unpack_from("<17I", ram, layout.MBI_ADDR), strict=True))


def c_string(ram: bytearray, address: int) -> bytes:
    return bytes(ram[address : ram.index(0, address)])


def test_load_multiboot_elf() -> None:
    code = bytes(range(256)) * 4
    image = make_elf([(0x100000, code, 0x3000), (0x200000, b"data", 0x10)], entry=0x100010)
    ram = bytearray(b"\xaa" * RAM)
    info = load_guest(image, ram, "cpus=2 limit=5")

    assert info == BootInfo(entry=0x100010, eax=0x2BADB002, ebx=0x9000)
    assert ram[0x100000 : 0x100000 + len(code)] == code
    assert ram[0x100000 + len(code) : 0x103000] == bytes(0x3000 - len(code))  # bss zeroed
    assert ram[0x103000] == 0xAA  # and nothing beyond it
    assert ram[0x200000:0x200010] == b"data" + bytes(12)

    mbi = mbi_fields(ram)
    assert mbi["flags"] == (1 << 0) | (1 << 2) | (1 << 6) | (1 << 9)
    assert mbi["mem_lower"] == 640
    assert mbi["mem_upper"] == (RAM - MiB) // 1024
    assert mbi["cmdline"] == 0x9800
    assert c_string(ram, 0x9800) == b"cpus=2 limit=5"
    assert c_string(ram, mbi["boot_loader_name"]) == b"intrahost"
    entries = [
        struct.unpack_from("<IQQI", ram, mbi["mmap_addr"] + offset)
        for offset in range(0, mbi["mmap_length"], 24)
    ]
    assert entries == [(20, 0, 640 * 1024, 1), (20, MiB, RAM - MiB, 1)]
    assert mbi["mods_count"] == 0


def test_load_translates_a_virtual_entry_point() -> None:
    image = bytearray(make_elf([(0x100000, b"\x90" * 16, 16)]))
    struct.pack_into("<I", image, 52 + 8, 0xC0100000)  # p_vaddr of segment 0
    struct.pack_into("<I", image, 24, 0xC0100004)  # e_entry
    assert load_guest(bytes(image), bytearray(RAM), "").entry == 0x100004


def test_load_raw_binary() -> None:
    ram = bytearray(RAM)
    info = load_guest(b"\xfa\xf4", ram, "")
    assert info == BootInfo(entry=0x100000, eax=0, ebx=0)
    assert ram[0x100000:0x100003] == b"\xfa\xf4\x00"
    assert ram[0x9000:0xA000] == bytes(0x1000)  # no multiboot information


def test_load_into_an_mmap() -> None:
    import mmap

    with mmap.mmap(-1, RAM) as ram:
        load_guest(make_elf(), ram, "x=1")
        assert ram[0x9800:0x9804] == b"x=1\0"
    # the loader released its views: closing the mmap did not raise


MALFORMED: list[tuple[str, Callable[[], bytes], str, int]] = [
    ("elf64", lambda: make_elf(elf_class=2), "64-bit ELF", RAM),
    ("bad class", lambda: make_elf(elf_class=7), "not a 32-bit ELF", RAM),
    ("truncated ident", lambda: make_elf()[:10], "truncated ELF header", RAM),
    ("truncated header", lambda: make_elf()[:40], "truncated ELF header", RAM),
    ("not x86", lambda: make_elf(machine=62), "not an x86 ELF", RAM),
    ("not executable", lambda: make_elf(e_type=3), "not an executable", RAM),
    ("no multiboot", lambda: make_elf(mb_offset=9000), "no multiboot header", RAM),
    ("bad checksum", lambda: make_elf(mb_checksum_delta=1), "bad checksum", RAM),
    ("unaligned header", lambda: make_elf(mb_offset=150), "no multiboot header", RAM),
    ("video mode", lambda: make_elf(mb_flags=0x4), "video mode", RAM),
    ("address fields", lambda: make_elf(mb_flags=0x10002), "flag bit 16", RAM),
    ("unknown requirement", lambda: make_elf(mb_flags=0x8), r"flag bits 0x8\b", RAM),
    ("outside RAM", lambda: make_elf([(RAM - 0x100, b"x", 0x200)]), "outside guest RAM", RAM),
    ("over 4 GiB", lambda: make_elf([(0xFFFFF000, b"x", 0x2000)]), "beyond 4 GiB", RAM),
    ("over the mbi", lambda: make_elf([(0x9800, b"x", 0x10)]), "multiboot information", RAM),
    (
        "overlapping segments",
        lambda: make_elf([(0x100000, b"a", 0x2000), (0x101000, b"b", 0x10)]),
        "overlaps PT_LOAD segment 0",
        RAM,
    ),
    ("filesz > memsz", lambda: make_elf([(0x100000, b"abcd", 2)]), "exceeds memory size", RAM),
    (
        "no PT_LOAD",
        lambda: make_elf([], extra_phdrs=[(4, 0, 0, 0, 0, 0, 4, 4)]),
        "no loadable",
        RAM,
    ),
    ("no program headers", lambda: make_elf([]), "no program headers", RAM),
    ("entry outside", lambda: make_elf(entry=0x500000), "entry point 0x500000", RAM),
    (
        "segment beyond file",
        lambda: make_elf(extra_phdrs=[(1, 0x10000, 0x300000, 0x300000, 0x100, 0x100, 6, 0)]),
        "PT_LOAD segment 1 needs bytes up to",
        RAM,
    ),
    (
        "phdrs beyond file",
        lambda: make_elf()[:60],
        "program headers end at",
        RAM,
    ),
    ("RAM too small", lambda: make_elf(), "at least 1 MiB", 512 * 1024),
    ("raw too large", lambda: b"\x90" * 0x2000, "beyond guest RAM", MiB + 0x1000),
    ("raw empty", lambda: b"", "empty", RAM),
]


@pytest.mark.parametrize(
    ("make_image", "message", "ram_size"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_images(make_image: Callable[[], bytes], message: str, ram_size: int) -> None:
    with pytest.raises(GuestLoadError, match=message):
        load_guest(make_image(), bytearray(ram_size), "")


def test_raw_binary_with_a_multiboot_header() -> None:
    image = b"\x90" * 8 + struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    with pytest.raises(GuestLoadError, match="not an ELF file"):
        load_guest(image, bytearray(RAM), "")


def test_raw_binary_ignores_the_command_line() -> None:
    ram = bytearray(RAM)
    assert load_guest(b"\xf4", ram, "cpus=2") == BootInfo(entry=0x100000, eax=0, ebx=0)
    assert ram[0x9000:0xA000] == bytes(0x1000)


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [("x" * 1024, "at most 1023 fit"), ("caf\u00e9=1", "ASCII"), ("a\0b", "NUL")],
)
def test_bad_command_lines(cmdline: str, message: str) -> None:
    with pytest.raises(GuestLoadError, match=message):
        load_guest(make_elf(), bytearray(RAM), cmdline)


def test_read_only_memory() -> None:
    with pytest.raises(GuestLoadError, match="read-only"):
        load_guest(make_elf(), bytes(RAM), "")


def test_read_guest_image(tmp_path: Path) -> None:
    assert read_guest_image("hello") == build_guest("hello").read_bytes()
    path = tmp_path / "raw.bin"
    path.write_bytes(b"\xf4")
    assert read_guest_image(str(path)) == b"\xf4"
    with pytest.raises(GuestLoadError, match=r"not a built-in guest .*and no such file"):
        read_guest_image(str(tmp_path / "missing"))
    with pytest.raises(GuestLoadError, match="cannot read guest image"):
        read_guest_image(str(tmp_path))  # a directory


def test_boot_cpu_state() -> None:
    state = boot_cpu_state(BootInfo(entry=0x100040, eax=0x2BADB002, ebx=0x9000))
    assert (state.rip, state.rax, state.rbx, state.rflags) == (0x100040, 0x2BADB002, 0x9000, 2)
    assert (state.cr0, state.cr3, state.cr4, state.efer) == (0x11, 0, 0, 0)
    assert (state.cs.type, state.cs.db, state.cs.l, state.cs.g, state.cs.s) == (0xB, 1, 0, 1, 1)
    assert (state.cs.base, state.cs.limit, state.cs.present, state.cs.dpl) == (0, 2**32 - 1, 1, 0)
    for segment in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert (segment.type, segment.db, segment.limit, segment.s) == (0x3, 1, 2**32 - 1, 1)


# --- layout --------------------------------------------------------------------------------------


def _common_inc() -> dict[str, int]:
    """The ``.set NAME, expression`` constants of src/common.inc, evaluated."""
    values: dict[str, int] = {}
    text = (build.SOURCE_DIR / "common.inc").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for name, expression in re.findall(r"^\s*\.set\s+(\w+),\s*(.+?)\s*$", text, flags=re.M):
        values[name] = eval(expression, {}, dict(values))  # our own file: hex, names, + - << >>
    return values


def test_common_inc_matches_layout() -> None:
    inc = _common_inc()
    pairs = {
        "UART_DATA": layout.UART_BASE,
        "UART_LSR": layout.UART_LSR,
        "UART_LSR_THRE": layout.UART_LSR_THRE,
        "DEBUG_TAG": layout.DEBUG_PORT_TAG,
        "DEBUG_VALUE_LO": layout.DEBUG_PORT_VALUE_LO,
        "DEBUG_VALUE_HI": layout.DEBUG_PORT_VALUE_HI,
        "DEBUG_EXIT": layout.DEBUG_PORT_EXIT,
        "TAG_VCPU_SHIFT": layout.REPORT_VCPU_SHIFT,
        "STATUS_BASE": layout.STATUS_ADDR,
        "STATUS_CPUS": layout.STATUS_CPUS,
        "STATUS_RUNNING": layout.STATUS_RUNNING,
        "STATUS_PROGRESS": layout.STATUS_PROGRESS,
        "STATUS_LIMIT": layout.STATUS_LIMIT,
        "SLOT_BASE": layout.SLOTS_ADDR,
        "SLOT_COUNTER": layout.SLOT_COUNTER,
        "SLOT_MAX_GAP": layout.SLOT_MAX_GAP,
        "SLOT_LAST_TSC": layout.SLOT_LAST_TSC,
        "SLOT_CHECKSUM": layout.SLOT_CHECKSUM,
        "SLOT_LINES": layout.SLOT_LINES,
        "SLOT_GAPS": layout.SLOT_GAPS,
        "STATUS_END": layout.STATUS_END,
        "GAPS_BASE": layout.GAPS_ADDR,
        "GAP_ENTRIES": layout.GAP_ENTRIES,
        "GAP_MIN_TICKS": layout.GAP_MIN_TICKS,
        "GAPS_END": layout.GAPS_END,
        "REGION_BASE": layout.REGION_ADDR,
        "REGION_WORDS": layout.REGION_WORDS,
        "SWEEP_BASE": layout.SWEEP_ADDR,
        "MAX_CPUS": layout.MAX_VCPUS,
        "IMAGE_BASE": layout.IMAGE_BASE,
        "AP_TRAMPOLINE": layout.AP_TRAMPOLINE_ADDR,
        "SIPI_VECTOR": layout.SIPI_VECTOR,
        "LAPIC_BASE": layout.LAPIC_BASE,
        "MB_BOOT_MAGIC": MULTIBOOT_BOOT_MAGIC,
    }
    assert {name: inc[name] for name in pairs} == pairs
    assert 1 << inc["SLOT_SHIFT"] == layout.SLOT_SIZE
    assert 1 << inc["GAPS_SHIFT"] == layout.GAPS_STRIDE == 16 * layout.GAP_ENTRIES
    assert 1 << inc["REGION_SHIFT"] == layout.REGION_STRIDE
    for tag in ReportTag:
        assert inc[f"TAG_{tag.name}"] == tag.value
    for code in ExitCode:
        assert inc[f"EXIT_{code.name}"] == code.value
    counter_source = (build.SOURCE_DIR / "counter.S").read_text()
    assert f"movabsq ${layout.REGION_MULTIPLIER:#X}".replace("0X", "0x") in counter_source
    assert f'.ascii "{layout.STATUS_MAGIC.decode()}"' in counter_source
    assert f".set DEFAULT_PROGRESS, {layout.DEFAULT_PROGRESS:#x}" in counter_source


def write_status(mem: bytearray, cpus: int, progress: int = 1 << 26, limit: int = 0) -> None:
    struct.pack_into(
        "<8sIIQQ", mem, layout.STATUS_ADDR, layout.STATUS_MAGIC, cpus, cpus, progress, limit
    )


def simulate(mem: bytearray, vcpu: int, iterations: int) -> None:
    """What the guest's loop stores, in the guest's order, for ``iterations`` iterations."""
    slot = layout.slot_addr(vcpu)
    region = layout.region_addr(vcpu)
    counter = struct.unpack_from("<Q", mem, slot)[0]
    checksum = struct.unpack_from("<Q", mem, slot + layout.SLOT_CHECKSUM)[0]
    for _ in range(iterations):
        counter += 1
        index = counter % layout.REGION_WORDS
        new = layout.region_value(counter)
        old = struct.unpack_from("<Q", mem, region + 8 * index)[0]
        struct.pack_into("<Q", mem, region + 8 * index, new)
        checksum = (checksum + new - old) % (1 << 64)
        struct.pack_into("<Q", mem, slot + layout.SLOT_CHECKSUM, checksum)
        struct.pack_into("<Q", mem, slot, counter)


@pytest.fixture
def counter_memory() -> bytearray:
    mem = bytearray(8 * MiB)
    write_status(mem, cpus=2)
    simulate(mem, 0, 20000)  # wraps the 8192-word region twice
    simulate(mem, 1, 100)
    return mem


def test_read_status(counter_memory: bytearray) -> None:
    status = layout.read_status(counter_memory)
    assert (status.cpus, status.running, status.progress, status.limit) == (2, 2, 1 << 26, 0)
    assert [slot.counter for slot in status.slots] == [20000, 100]
    assert status.total == 20100
    assert layout.read_slot(counter_memory, 1) == status.slots[1]


def test_read_status_without_magic() -> None:
    with pytest.raises(GuestStatusMissing, match="IHCNTR01"):
        layout.read_status(bytearray(8 * MiB))


def test_memory_too_small() -> None:
    with pytest.raises(GuestLayoutError, match="at least 8 MiB"):
        layout.read_status(bytearray(MiB))
    with pytest.raises(GuestLayoutError, match=r"outside 0\.\.63"):
        layout.verify_region(bytearray(8 * MiB), 64)


def test_verify_region_good(counter_memory: bytearray) -> None:
    layout.verify_region(counter_memory, 0)
    layout.verify_region(counter_memory, 1)
    layout.verify_region(counter_memory, 5)  # never started: all zero is consistent
    layout.verify_region(bytes(counter_memory), 0)  # read-only views are fine


def test_verify_region_allows_one_iteration_in_flight(counter_memory: bytearray) -> None:
    slot = layout.slot_addr(0)
    index = 20001 % layout.REGION_WORDS
    word_at = layout.region_addr(0) + 8 * index
    old = struct.unpack_from("<Q", counter_memory, word_at)[0]
    new = layout.region_value(20001)
    struct.pack_into("<Q", counter_memory, word_at, new)  # store 1 done
    layout.verify_region(counter_memory, 0)
    checksum = struct.unpack_from("<Q", counter_memory, slot + layout.SLOT_CHECKSUM)[0]
    struct.pack_into(
        "<Q", counter_memory, slot + layout.SLOT_CHECKSUM, (checksum + new - old) % (1 << 64)
    )  # store 2 done
    layout.verify_region(counter_memory, 0)


def test_verify_region_rejects_a_checksum_ahead_of_its_word(counter_memory: bytearray) -> None:
    slot = layout.slot_addr(0)
    struct.pack_into("<Q", counter_memory, slot + layout.SLOT_CHECKSUM, 12345)
    with pytest.raises(GuestMemoryCorrupt, match=r"vCPU 0: checksum at 0x200118 is 0x0*3039"):
        layout.verify_region(counter_memory, 0)


def test_verify_region_names_the_first_bad_word(counter_memory: bytearray) -> None:
    for index in (4000, 17):
        counter_memory[layout.region_addr(0) + 8 * index] ^= 0x01
    with pytest.raises(GuestMemoryCorrupt, match=r"vCPU 0: region word 17 at 0x400088 is"):
        layout.verify_region(counter_memory, 0)
    layout.verify_region(counter_memory, 1)


def test_verify_region_catches_a_lost_counter_update(counter_memory: bytearray) -> None:
    struct.pack_into("<Q", counter_memory, layout.slot_addr(1), 98)  # two behind its words
    with pytest.raises(GuestMemoryCorrupt, match=r"vCPU 1: region word 100 .* counter 98"):
        layout.verify_region(counter_memory, 1)


def test_reset_max_gap(counter_memory: bytearray) -> None:
    struct.pack_into("<Q", counter_memory, layout.slot_addr(1) + layout.SLOT_MAX_GAP, 999)
    assert layout.read_slot(counter_memory, 1).max_gap == 999
    layout.reset_max_gap(counter_memory, 1)
    assert layout.read_slot(counter_memory, 1).max_gap == 0
    with pytest.raises(GuestLayoutError, match="writable"):
        layout.reset_max_gap(bytes(counter_memory), 1)


def test_report_tags() -> None:
    raw = layout.report_tag(ReportTag.CHECKSUM, 5)
    assert raw == 0x50003
    assert layout.split_report_tag(raw) == (ReportTag.CHECKSUM, 5)
    with pytest.raises(GuestLayoutError):
        layout.report_tag(ReportTag.COUNTER, 256)


def test_expected_region() -> None:
    words = layout.expected_region(8193)
    assert words[0] == layout.region_value(8192)
    assert words[1] == layout.region_value(8193)
    assert words[2] == layout.region_value(2)
    assert layout.expected_region(0) == [0] * layout.REGION_WORDS


# --- the guests under QEMU -----------------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None or not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86) and access to /dev/kvm",
)
QEMU_TIMEOUT = PATIENCE
PROGRESS_LINE = re.compile(r"cpu(\d+) count=([0-9a-f]{16})")


def qemu_command(tmp_path: Path, guest: str, append: str, smp: int, *extra: str) -> list[str]:
    assert QEMU is not None
    return [
        QEMU, "-machine", "q35", "-accel", "kvm", "-m", "64", "-smp", str(smp),
        "-display", "none", "-monitor", "none", "-nodefaults", "-no-reboot",
        "-serial", f"file:{tmp_path / 'serial.log'}",
        "-kernel", str(build_guest(guest)), "-append", append,
        # Our exit port: QEMU exits with status (code << 1) | 1 on `out 0x50c, al`.
        "-device", "isa-debug-exit,iobase=0x50c,iosize=1",
        *extra,
    ]  # fmt: skip


def run_qemu(tmp_path: Path, guest: str, append: str = "", smp: int = 1) -> tuple[int, str]:
    """Boot ``guest``; return the guest's exit code and its UART output."""
    process = subprocess.Popen(
        qemu_command(tmp_path, guest, append, smp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = process.communicate(timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        serial = (tmp_path / "serial.log").read_text()
        pytest.fail(f"the guest did not end within {QEMU_TIMEOUT} s; UART output:\n{serial}")
    status = process.returncode
    assert status & 1, f"QEMU ended without the guest's exit code ({status}): {stderr!r}"
    return status >> 1, (tmp_path / "serial.log").read_text()


@needs_qemu
def test_qemu_hello(tmp_path: Path) -> None:
    code, serial = run_qemu(tmp_path, "hello")
    assert (code, serial) == (ExitCode.OK, "Hello from intrahost\n")


@needs_qemu
@pytest.mark.parametrize("cpus", [1, 4])
def test_qemu_counter_runs_to_its_limit(tmp_path: Path, cpus: int) -> None:
    progress, limit = 1 << 24, 1 << 26
    code, serial = run_qemu(
        tmp_path, "counter", f"cpus={cpus} progress={progress:#x} limit={limit}", smp=cpus
    )
    lines = serial.splitlines()
    assert code == ExitCode.OK, serial
    assert lines[0] == f"counter: cpus={cpus} progress={progress} limit={limit} sweep=0"
    assert lines[-1] == "done"
    seen: dict[int, list[int]] = {cpu: [] for cpu in range(cpus)}
    for line in lines[1:-1]:
        match = PROGRESS_LINE.fullmatch(line)
        assert match, f"not a progress line: {line!r}"
        seen[int(match[1])].append(int(match[2], 16))
    expected = list(range(progress, limit + 1, progress))
    assert seen == dict.fromkeys(range(cpus), expected)


@needs_qemu
@pytest.mark.parametrize(
    ("append", "smp", "code", "message"),
    [
        ("cpus=65", 1, ExitCode.BAD_CMDLINE, r"bad value \(cpus 1-64, .*\): cpus=65"),
        ("progress=3", 1, ExitCode.BAD_CMDLINE, r"bad value .*: progress=3"),
        ("limit=0x", 1, ExitCode.BAD_CMDLINE, r"bad value .*: limit=0x"),
        ("cpu=2", 1, ExitCode.BAD_CMDLINE, r"unknown command line key .*: cpu=2"),
        ("sweep=64", 1, ExitCode.NO_MEMORY, r"not enough guest RAM .* needs 80 MiB"),
        ("cpus=2", 1, ExitCode.AP_TIMEOUT, "only 1 of 2 vCPUs started"),
    ],
    ids=["cpus", "progress", "limit", "unknown", "memory", "ap-timeout"],
)
def test_qemu_counter_errors(
    tmp_path: Path, append: str, smp: int, code: ExitCode, message: str
) -> None:
    got, serial = run_qemu(tmp_path, "counter", append, smp)
    assert got == code, serial
    assert re.search(f"counter: error: {message}", serial), serial


@pytest.fixture
def qemu_counter(tmp_path: Path) -> Iterator[tuple[Qmp, Path]]:
    """A running 2-vCPU counter guest under QEMU with a QMP socket."""
    qmp_path = tmp_path / "qmp.sock"
    command = qemu_command(
        tmp_path, "counter", "cpus=2 progress=0x2000000 sweep=4", 2,
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    )  # fmt: skip
    with running_qemu(command, qmp_path) as qmp:
        yield qmp, tmp_path


@needs_qemu
def test_qemu_counter_memory_is_consistent_when_paused(qemu_counter: tuple[Qmp, Path]) -> None:
    qmp, tmp_path = qemu_counter
    serial = tmp_path / "serial.log"
    deadline = time.monotonic() + QEMU_TIMEOUT
    while serial.read_text().count(" count=") < 2:  # both vCPUs well into their loops
        assert time.monotonic() < deadline, serial.read_text()
        time.sleep(0.05)
    qmp.execute("stop")
    dump = tmp_path / "ram.bin"
    qmp.execute("pmemsave", val=0, size=8 * MiB, filename=str(dump))
    memory = dump.read_bytes()

    status = layout.read_status(memory)
    assert (status.cpus, status.running, status.progress, status.limit) == (2, 2, 1 << 25, 0)
    for vcpu, slot in enumerate(status.slots):
        assert slot.counter >= 1 << 25
        assert slot.progress_lines >= 1
        assert 0 < slot.max_gap < slot.last_tsc
        layout.verify_region(memory, vcpu)
