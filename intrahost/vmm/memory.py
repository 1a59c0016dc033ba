"""Guest memory: always backed by a file descriptor, so that another process can map it.

By default the backing is a memfd (``MFD_CLOEXEC``, sized once and sealed so it can neither
shrink nor grow); ``--memory-path`` names a file instead (under /dev/shm, or on a hugetlbfs
mount). The whole file is mapped once, ``MAP_SHARED`` and lazily: pages are allocated when the
guest first touches them (``MAP_POPULATE`` would cost ~0.4 s per GiB on these hosts).

Guest-physical layout (x86): RAM below 3 GiB is one slot at address 0; RAM beyond that goes
above 4 GiB, leaving the top GiB of the 32-bit space for the local APIC, the IOAPIC and KVM's
TSS and identity-map pages. Both slots map the same file at different offsets.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import stat
from dataclasses import dataclass

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError
from intrahost.kvm import Vm

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB
PAGE_SIZE = mmap.PAGESIZE
MIN_MEMORY = 16 * MiB
MADV_POPULATE_WRITE = 23  # Linux 5.14+

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class MemoryConfigError(IntrahostError):
    """The requested guest memory cannot be set up (size, path, host capacity)."""


class GuestAccessError(IntrahostError):
    """A guest-physical range that is not wholly guest RAM (a device asked to read or write
    it must refuse: the guest is not trusted)."""


@dataclass(frozen=True)
class MemorySlot:
    """One KVM memory slot: guest-physical range and where it lies in the backing file."""

    slot: int
    guest_phys_addr: int
    size: int
    file_offset: int


def slot_layout(size: int) -> tuple[MemorySlot, ...]:
    """The slots for ``size`` bytes of RAM (see the module docstring)."""
    low = min(size, LOW_RAM_LIMIT)
    slots = [MemorySlot(0, 0, low, 0)]
    if size > LOW_RAM_LIMIT:
        slots.append(MemorySlot(1, HIGH_RAM_BASE, size - LOW_RAM_LIMIT, LOW_RAM_LIMIT))
    return tuple(slots)


def parse_size(text: str) -> int:
    """'256M', '4G', '65536K' or a byte count."""
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise MemoryConfigError(f"invalid size {text!r}: use a number with K, M or G") from None


def _host_capacity() -> int:
    """RAM plus swap: the most shared memory this host can ever back."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value, *_ = line.split()
            fields[key.rstrip(":")] = int(value) * KiB
    return fields.get("MemTotal", 0) + fields.get("SwapTotal", 0)


class GuestMemory(Closeable):
    """An fd-backed guest RAM mapping and its KVM slots."""

    def __init__(self, fd: int, size: int, path: str | None = None) -> None:
        """Adopt ``fd`` (owned from now on) holding ``size`` bytes of guest RAM."""
        if size < MIN_MEMORY or size % PAGE_SIZE:
            os.close(fd)
            raise MemoryConfigError(
                f"guest memory must be a multiple of {PAGE_SIZE} bytes and at least "
                f"{MIN_MEMORY // MiB} MiB, got {size} bytes"
            )
        actual = os.fstat(fd).st_size
        if actual < size:
            os.close(fd)
            raise MemoryConfigError(f"the memory fd holds {actual} bytes, expected {size}")
        self.fd = fd
        self.size = size
        self.path = path
        self.slots = slot_layout(size)
        self._map: mmap.mmap | None = mmap.mmap(
            fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)

    # --- creation ------------------------------------------------------------------------------

    @classmethod
    def create(cls, size: int, path: str | None = None, name: str = "intrahost-ram") -> GuestMemory:
        """New guest RAM: a sealed memfd, or the file at ``path``."""
        if size > _host_capacity():
            raise MemoryConfigError(
                f"{size // MiB} MiB of guest memory is more than this host can back "
                f"({_host_capacity() // MiB} MiB of RAM and swap)"
            )
        if path is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(
                    fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
                )
            except OSError:
                os.close(fd)
                raise
            return cls(fd, size)
        return cls(cls._open_file(path, size), size, path)

    @staticmethod
    def _open_file(path: str, size: int) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MemoryConfigError(f"cannot open memory file {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MemoryConfigError(f"memory path {path} is not a regular file")
            if st.st_size not in (0, size):
                raise MemoryConfigError(
                    f"memory file {path} holds {st.st_size} bytes; the guest needs {size} "
                    "(remove it or pass a matching --memory)"
                )
            vfs = os.fstatvfs(fd)
            if st.st_size == 0 and vfs.f_bavail * vfs.f_frsize < size:
                raise MemoryConfigError(
                    f"the file system of {path} has {vfs.f_bavail * vfs.f_frsize // MiB} MiB "
                    f"free; the guest needs {size // MiB} MiB"
                )
            os.ftruncate(fd, size)
        except MemoryConfigError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise MemoryConfigError(f"cannot size memory file {path}: {e.strerror}") from None
        return fd

    # --- use -----------------------------------------------------------------------------------

    @property
    def buffer(self) -> mmap.mmap:
        """The mapping: guest-physical address A of the low slot is ``buffer[A]``."""
        if self._map is None:
            raise MemoryConfigError("guest memory is closed")
        return self._map

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at guest-physical address ``gpa``.

        The whole range must lie in one RAM slot (the slots are not adjacent in guest-physical
        space: a range crossing the 3 GiB hole is not RAM); anything else raises
        :class:`GuestAccessError`, so a device handed an address by the guest can never reach
        outside guest memory. The view pins the mapping: drop it before :meth:`close`."""
        if gpa >= 0 and length >= 0:
            end = gpa + length
            for s in self.slots:
                base = s.guest_phys_addr
                if base <= gpa and end <= base + s.size:
                    start = s.file_offset + gpa - base
                    return memoryview(self.buffer)[start : start + length]
        raise GuestAccessError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def file_offset(self, gpa: int, length: int) -> int:
        """Where ``length`` bytes at ``gpa`` lie in the backing file (same checks as
        :meth:`view`)."""
        if gpa >= 0 and length >= 0:
            end = gpa + length
            for s in self.slots:
                if s.guest_phys_addr <= gpa and end <= s.guest_phys_addr + s.size:
                    return s.file_offset + gpa - s.guest_phys_addr
        raise GuestAccessError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def register(self, vm: Vm) -> None:
        """Register every slot with ``vm``."""
        for s in self.slots:
            vm.set_user_memory_region(
                s.slot, s.guest_phys_addr, s.size, self.address + s.file_offset
            )

    def resident_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) runs of pages of the backing file that are in memory (mincore on
        the mapping: for a shared file mapping it reports the page cache)."""
        pages = (self.size + PAGE_SIZE - 1) // PAGE_SIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        # mincore sets bit 0 of a page's byte when the page is resident: find the runs.
        return [
            (m.start() * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE)
            for m in re.finditer(rb"[^\x00]+", bytes(vec))
        ]

    def populate(self, ranges: list[tuple[int, int]]) -> int:
        """Fault these ranges into this process's page tables now (MADV_POPULATE_WRITE), so
        that the guest's first touches after a hand-off find them mapped. Returns bytes."""
        total = 0
        for offset, length in ranges:
            self.buffer.madvise(MADV_POPULATE_WRITE, offset, length)
            total += length
        return total

    def data_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) extents of the backing file that hold data (SEEK_DATA /
        SEEK_HOLE): the pages ever written. Holes read as zeros without being allocated."""
        ranges: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            ranges.append((start, end - start))
            offset = end
        return ranges

    def is_fd_backed(self) -> bool:
        return self.fd >= 0

    def close(self) -> None:
        self._anchor = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
