"""Load a guest image into guest RAM the way a multiboot (version 1) boot loader would.

Two kinds of image are accepted:

* a 32-bit x86 ELF executable with a multiboot header in its first 8 KiB: its PT_LOAD
  segments are copied to their physical addresses, a multiboot information structure is
  written at :data:`~intrahost.vmm.guests.layout.MBI_ADDR` and the guest starts at the
  ELF entry point with EAX = 0x2BADB002, EBX = the structure's address;
* anything that is not an ELF file: a raw binary, copied to 1 MiB and entered there with
  EAX = EBX = 0 (the command line is ignored: it has nowhere to go).

The CPU state both start in is the multiboot one, described as plain data by
:func:`boot_cpu_state`; turning it into ``kvm_sregs`` is the VMM's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from intrahost.errors import IntrahostError
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.build import build_guest, list_guests

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002

# Multiboot header flags we can honour: bit 0 (align modules: we load none), bit 1 (memory
# information: always provided). Bit 2 (video mode) and bits 3-15 are requirements we do not
# meet. Of the optional bits 16-31, bit 16 (load addresses in the header instead of the ELF
# program headers, the "a.out kludge") would change where the image goes, so it is refused
# rather than ignored; the others are ignored as the specification allows.
MB_HEADER_ALIGN_MODULES = 1 << 0
MB_HEADER_MEMORY_INFO = 1 << 1
MB_HEADER_VIDEO_MODE = 1 << 2
MB_HEADER_ADDRESS_FIELDS = 1 << 16
_MB_HEADER_SUPPORTED = MB_HEADER_ALIGN_MODULES | MB_HEADER_MEMORY_INFO

# Multiboot information flags we set.
MBI_FLAG_MEMORY = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9
MBI_MEMORY_AVAILABLE = 1
LOADER_NAME = b"intrahost\0"

LOW_MEMORY_END = 640 * 1024  # conventional memory; [640 KiB, 1 MiB) is not RAM

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32 = 1
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EV_CURRENT = 1
_ET_EXEC = 2
_EM_386 = 3
_PT_LOAD = 1
# e_ident (16 bytes), then type, machine, version, entry, phoff, shoff, flags, ehsize,
# phentsize, phnum, shentsize, shnum, shstrndx.
_ELF32_HEADER = struct.Struct("<16sHHIIIIIHHHHHH")
# type, offset, vaddr, paddr, filesz, memsz, flags, align.
_ELF32_PHDR = struct.Struct("<IIIIIIII")
_MB_HEADER = struct.Struct("<III")
# flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr, syms[4],
# mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name.
_MBI = struct.Struct("<IIIIIII16sIIIIII")
# size (of the rest of the entry), base_addr, length, type.
_MMAP_ENTRY = struct.Struct("<IQQI")

_U32_MAX = 0xFFFF_FFFF


class GuestLoadError(IntrahostError):
    """A guest image cannot be loaded (malformed, unsupported, or does not fit in RAM)."""


@dataclass(frozen=True)
class BootInfo:
    """Where the boot vCPU starts, and its EAX/EBX (multiboot magic and info address)."""

    entry: int
    eax: int
    ebx: int


@dataclass(frozen=True)
class SegmentState:
    """A segment register as the VMM must load it (the fields of ``kvm_segment``).

    ``limit`` is in bytes (0xFFFFFFFF for a flat 4 GiB segment with ``g`` = 1).
    """

    selector: int
    base: int
    limit: int
    type: int
    s: int
    dpl: int
    present: int
    db: int
    g: int
    l: int  # noqa: E741 - the name of the descriptor bit


@dataclass(frozen=True)
class TableState:
    """A descriptor-table register (GDTR or IDTR)."""

    base: int
    limit: int


@dataclass(frozen=True)
class BootCpuState:
    """The boot vCPU's state at the first guest instruction (multiboot: 32-bit, flat,
    paging off). General registers not listed are 0."""

    rip: int
    rax: int
    rbx: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: SegmentState
    ds: SegmentState
    es: SegmentState
    fs: SegmentState
    gs: SegmentState
    ss: SegmentState
    tr: SegmentState
    ldt: SegmentState
    gdt: TableState
    idt: TableState


BOOT_CODE_SELECTOR = 0x08
BOOT_DATA_SELECTOR = 0x10
CR0_PE = 1 << 0
CR0_ET = 1 << 4
RFLAGS_FIXED = 1 << 1


def boot_cpu_state(boot: BootInfo) -> BootCpuState:
    """The multiboot boot state for ``boot``.

    CS is a flat 32-bit execute/read segment, the data segments flat read/write ones, paging
    is off and interrupts are disabled. As the specification warns, GDTR and IDTR are not
    usable: the guest must load its own before it reloads a segment register.
    """
    code = SegmentState(
        selector=BOOT_CODE_SELECTOR,
        base=0,
        limit=_U32_MAX,
        type=0xB,  # execute/read, accessed
        s=1,
        dpl=0,
        present=1,
        db=1,
        g=1,
        l=0,
    )
    data = SegmentState(
        selector=BOOT_DATA_SELECTOR,
        base=0,
        limit=_U32_MAX,
        type=0x3,  # read/write, accessed
        s=1,
        dpl=0,
        present=1,
        db=1,
        g=1,
        l=0,
    )
    task = SegmentState(
        selector=0, base=0, limit=0xFFFF, type=0xB, s=0, dpl=0, present=1, db=0, g=0, l=0
    )  # busy 32-bit TSS, as after reset: VMX requires a usable TR
    ldt = SegmentState(
        selector=0, base=0, limit=0xFFFF, type=0x2, s=0, dpl=0, present=1, db=0, g=0, l=0
    )
    return BootCpuState(
        rip=boot.entry,
        rax=boot.eax,
        rbx=boot.ebx,
        rflags=RFLAGS_FIXED,
        cr0=CR0_PE | CR0_ET,
        cr3=0,
        cr4=0,
        efer=0,
        cs=code,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=task,
        ldt=ldt,
        gdt=TableState(base=0, limit=0xFFFF),
        idt=TableState(base=0, limit=0xFFFF),
    )


def read_guest_image(spec: str) -> bytes:
    """The bytes of a built-in guest (``hello``, ``counter``: built on first use) or a file.

    A bare name of a built-in guest means the built-in one; write ``./hello`` for a file of
    that name in the current directory.
    """
    if spec in list_guests():
        return build_guest(spec).read_bytes()
    path = Path(spec)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GuestLoadError(
            f"no guest image {spec!r}: not a built-in guest ({', '.join(list_guests())}) "
            "and no such file"
        ) from None
    except OSError as error:
        raise GuestLoadError(f"cannot read guest image {spec!r}: {error.strerror}") from None


def load_guest(image: bytes, memory: WriteableBuffer, cmdline: str) -> BootInfo:
    """Copy ``image`` into guest RAM (``memory[A]`` is guest-physical ``A``) and return where
    the boot vCPU starts. Raises :class:`GuestLoadError` for anything it cannot load."""
    with memoryview(memory) as raw, raw.cast("B") as ram:
        if ram.readonly:
            raise GuestLoadError("guest memory is read-only: the loader needs a writable view")
        if len(ram) < layout.IMAGE_BASE:
            raise GuestLoadError(
                f"guest RAM of {len(ram)} bytes is too small: at least 1 MiB is needed "
                "(images load at 1 MiB)"
            )
        if image[:4] != _ELF_MAGIC:
            return _load_raw(image, ram, cmdline)
        return _load_multiboot_elf(image, ram, cmdline)


# --- raw binaries --------------------------------------------------------------------------------


def _load_raw(image: bytes, ram: memoryview, cmdline: str) -> BootInfo:
    header = _find_multiboot_header(image)
    if header is not None:
        raise GuestLoadError(
            f"the image has a multiboot header (at offset {header[0]:#x}) but is not an ELF "
            "file: multiboot images must be 32-bit ELF executables here (the a.out kludge, "
            "header flag bit 16, is not supported)"
        )
    del cmdline  # a raw binary starts with EBX = 0: there is nowhere to pass it
    if not image:
        raise GuestLoadError("the guest image is empty")
    end = layout.IMAGE_BASE + len(image)
    if end > len(ram):
        raise GuestLoadError(
            f"raw binary of {len(image)} bytes loaded at {layout.IMAGE_BASE:#x} ends at "
            f"{end:#x}, beyond guest RAM ({len(ram):#x} bytes)"
        )
    ram[layout.IMAGE_BASE : end] = image
    return BootInfo(entry=layout.IMAGE_BASE, eax=0, ebx=0)


# --- multiboot ELF -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


def _load_multiboot_elf(image: bytes, ram: memoryview, cmdline: str) -> BootInfo:
    entry, segments = _parse_elf32(image)
    _check_multiboot_header(image)
    cmdline_bytes = _encode_cmdline(cmdline)

    reserved = (layout.MBI_ADDR, layout.MBI_END)
    placed: list[_Segment] = []
    for segment in segments:
        start, end = segment.paddr, segment.paddr + segment.memsz
        where = f"PT_LOAD segment {segment.index} [{start:#x}, {end:#x})"
        if end > len(ram):
            raise GuestLoadError(f"{where} lies outside guest RAM ({len(ram):#x} bytes)")
        if start < reserved[1] and reserved[0] < end:
            raise GuestLoadError(
                f"{where} overlaps the multiboot information the loader writes at "
                f"[{reserved[0]:#x}, {reserved[1]:#x})"
            )
        for other in placed:
            if start < other.paddr + other.memsz and other.paddr < end:
                raise GuestLoadError(f"{where} overlaps PT_LOAD segment {other.index}")
        placed.append(segment)

    entry_paddr = _entry_paddr(entry, placed)
    for segment in placed:
        data = image[segment.offset : segment.offset + segment.filesz]
        ram[segment.paddr : segment.paddr + segment.filesz] = data
        zero_start = segment.paddr + segment.filesz
        zero_end = segment.paddr + segment.memsz
        ram[zero_start:zero_end] = bytes(zero_end - zero_start)

    _write_multiboot_info(ram, cmdline_bytes)
    return BootInfo(entry=entry_paddr, eax=MULTIBOOT_BOOT_MAGIC, ebx=layout.MBI_ADDR)


def _parse_elf32(image: bytes) -> tuple[int, list[_Segment]]:
    """The entry point and non-empty PT_LOAD segments of a 32-bit x86 ELF executable."""
    if len(image) < 16:
        raise GuestLoadError(f"truncated ELF header: the image is only {len(image)} bytes")
    elf_class, data_encoding = image[4], image[5]
    if elf_class == _ELFCLASS64:
        raise GuestLoadError(
            "the image is a 64-bit ELF file: build a 32-bit (ELF32) multiboot image that "
            "switches to long mode itself (QEMU's -kernel has the same rule)"
        )
    if elf_class != _ELFCLASS32:
        raise GuestLoadError(f"not a 32-bit ELF file (EI_CLASS is {elf_class})")
    if data_encoding != _ELFDATA2LSB:
        raise GuestLoadError(f"not a little-endian ELF file (EI_DATA is {data_encoding})")
    if len(image) < _ELF32_HEADER.size:
        raise GuestLoadError(
            f"truncated ELF header: {len(image)} bytes, an ELF32 header is {_ELF32_HEADER.size}"
        )
    (_, e_type, e_machine, e_version, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = (
        _ELF32_HEADER.unpack_from(image, 0)
    )
    if e_machine != _EM_386:
        raise GuestLoadError(f"not an x86 ELF file (e_machine is {e_machine}, x86 is {_EM_386})")
    if e_type != _ET_EXEC:
        raise GuestLoadError(f"not an executable ELF file (e_type is {e_type}, want {_ET_EXEC})")
    if e_version != _EV_CURRENT:
        raise GuestLoadError(f"unknown ELF version {e_version}")
    if e_phnum == 0:
        raise GuestLoadError("the ELF file has no program headers")
    if e_phentsize != _ELF32_PHDR.size:
        raise GuestLoadError(
            f"ELF program header size is {e_phentsize}, expected {_ELF32_PHDR.size}"
        )
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(image):
        raise GuestLoadError(
            f"truncated ELF file: the program headers end at {table_end:#x}, "
            f"the file at {len(image):#x}"
        )

    segments: list[_Segment] = []
    for index in range(e_phnum):
        p_type, offset, vaddr, paddr, filesz, memsz, _, _ = _ELF32_PHDR.unpack_from(
            image, e_phoff + index * e_phentsize
        )
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise GuestLoadError(
                f"PT_LOAD segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            )
        if offset + filesz > len(image):
            raise GuestLoadError(
                f"truncated ELF file: PT_LOAD segment {index} needs bytes up to "
                f"{offset + filesz:#x}, the file ends at {len(image):#x}"
            )
        if paddr + memsz > 1 << 32:
            raise GuestLoadError(f"PT_LOAD segment {index} extends beyond 4 GiB")
        segments.append(_Segment(index, offset, vaddr, paddr, filesz, memsz))
    if not segments:
        raise GuestLoadError("the ELF file has no loadable (PT_LOAD) segment")
    return e_entry, segments


def _entry_paddr(entry: int, segments: list[_Segment]) -> int:
    """The physical entry address: the ELF entry is virtual, so translate it through the
    segment that contains it (the two are equal for identity-linked images)."""
    for segment in segments:
        if segment.vaddr <= entry < segment.vaddr + segment.memsz:
            return entry - segment.vaddr + segment.paddr
    raise GuestLoadError(f"the ELF entry point {entry:#x} is not inside any PT_LOAD segment")


def _find_multiboot_header(image: bytes) -> tuple[int, int] | None:
    """``(offset, flags)`` of the first valid multiboot header, or None."""
    limit = min(len(image), layout.MULTIBOOT_SEARCH_BYTES) - _MB_HEADER.size
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = _MB_HEADER.unpack_from(image, offset)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & _U32_MAX == 0:
            return offset, flags
    return None


def _check_multiboot_header(image: bytes) -> None:
    header = _find_multiboot_header(image)
    if header is None:
        near_miss = image[: layout.MULTIBOOT_SEARCH_BYTES].find(
            MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
        )
        detail = (
            f" (the magic at offset {near_miss:#x} has a bad checksum or alignment)"
            if near_miss >= 0
            else ""
        )
        raise GuestLoadError(
            "the ELF file has no multiboot header (magic 0x1BADB002 with a valid checksum, "
            f"4-byte aligned, in the first {layout.MULTIBOOT_SEARCH_BYTES} bytes){detail}"
        )
    offset, flags = header
    if flags & MB_HEADER_VIDEO_MODE:
        raise GuestLoadError(
            f"the multiboot header (offset {offset:#x}) asks for a video mode (flag bit 2): "
            "intrahost has no display"
        )
    if flags & MB_HEADER_ADDRESS_FIELDS:
        raise GuestLoadError(
            f"the multiboot header (offset {offset:#x}) sets flag bit 16 (load addresses in "
            "the header): intrahost loads ELF program headers only; clear the bit"
        )
    unknown = flags & 0xFFFF & ~_MB_HEADER_SUPPORTED
    if unknown:
        raise GuestLoadError(
            f"the multiboot header (offset {offset:#x}) requires features intrahost does not "
            f"provide (flag bits {unknown:#x})"
        )


def _encode_cmdline(cmdline: str) -> bytes:
    try:
        encoded = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise GuestLoadError("the guest command line must be ASCII") from None
    if b"\0" in encoded:
        raise GuestLoadError("the guest command line must not contain NUL characters")
    if len(encoded) >= layout.CMDLINE_MAX:
        raise GuestLoadError(
            f"the guest command line is {len(encoded)} bytes; at most {layout.CMDLINE_MAX - 1} fit"
        )
    return encoded + b"\0"


def _write_multiboot_info(ram: memoryview, cmdline: bytes) -> None:
    """The multiboot information at MBI_ADDR: memory sizes, memory map, command line and
    loader name. RAM is [0, 640 KiB) and [1 MiB, end of the buffer)."""
    ram_size = len(ram)
    mem_lower_kib = LOW_MEMORY_END // 1024
    mem_upper_kib = min((ram_size - layout.IMAGE_BASE) // 1024, _U32_MAX)
    entries = [(0, LOW_MEMORY_END)]
    if ram_size > layout.IMAGE_BASE:
        entries.append((layout.IMAGE_BASE, ram_size - layout.IMAGE_BASE))
    mmap = b"".join(
        _MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, base, length, MBI_MEMORY_AVAILABLE)
        for base, length in entries
    )
    info = _MBI.pack(
        MBI_FLAG_MEMORY | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME,
        mem_lower_kib,
        mem_upper_kib,
        0,  # boot_device: not set
        layout.CMDLINE_ADDR,
        0,  # mods_count
        0,  # mods_addr
        bytes(16),  # syms: not set
        len(mmap),
        layout.MBI_MMAP_ADDR,
        0,  # drives_length
        0,  # drives_addr
        0,  # config_table
        layout.MBI_LOADER_NAME_ADDR,
    )
    ram[layout.MBI_ADDR : layout.MBI_END] = bytes(layout.MBI_END - layout.MBI_ADDR)
    _put(ram, layout.MBI_ADDR, info)
    _put(ram, layout.MBI_MMAP_ADDR, mmap)
    _put(ram, layout.MBI_LOADER_NAME_ADDR, LOADER_NAME)
    _put(ram, layout.CMDLINE_ADDR, cmdline)


def _put(ram: memoryview, address: int, data: bytes) -> None:
    ram[address : address + len(data)] = data
