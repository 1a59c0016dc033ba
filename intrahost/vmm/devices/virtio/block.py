"""virtio-blk on a raw disk image (virtio 1.x, section 5.2), and the image itself.

:class:`DiskImage` is a raw image file (or block device) opened once and locked with an
open-file-description lock (``F_OFD_SETLK``: a write lock, a read lock for a read-only disk),
so that a second VMM cannot open the same image for writing. The lock belongs to the open
file description, not to the process: an fd passed to another VMM (SCM_RIGHTS) carries it,
which is how a hand-off keeps the image locked throughout (:meth:`DiskImage.from_fd`).

:class:`VirtioBlock` serves requests of one queue (requestq, index 0): a 16-byte header
(type u32, reserved u32, sector u64) in device-readable buffers, the data, then a one-byte
status in the last device-writable byte. IN reads with ``preadv`` straight into the guest's
buffers (views of guest memory: no copy), OUT writes with ``pwritev`` from them, FLUSH is
``fdatasync``, GET_ID writes the disk's id (at most 20 bytes). A request whose data does not
end within the image, is not a whole number of 512-byte sectors, or writes to a read-only disk
completes with IOERR; an unknown type with UNSUPP. A request without a header or a status byte
is malformed (the device needs a reset).

``direct=on`` opens the image with O_DIRECT. O_DIRECT needs buffers aligned to 512 bytes;
guest buffers that are not are served through an aligned bounce buffer (one copy), so
unaligned guests still work, more slowly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.vmm.devices.virtio.queue import MAX_QUEUE_SIZE, Chain, QueueError, VirtioStateError
from intrahost.vmm.persist import JsonRecord, bounded, json_object

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR = 512
#: The most data buffers per request (seg_max): the queue size less header and status.
SEG_MAX = MAX_QUEUE_SIZE - 2
#: GET_ID answers at most this many bytes.
ID_BYTES = 20
#: O_DIRECT's alignment for buffer addresses and lengths.
DIRECT_ALIGN = 512
#: How many I/O errors are logged per disk (then only counted).
ERROR_LOG_LIMIT = 16

_HEADER = struct.Struct("<IIQ")
_CONFIG = struct.Struct("<QIIIII")  # capacity, size_max, seg_max, geometry, blk_size, pad
_MAX_SECTOR = (2**63 - 1) // SECTOR


class DiskImageError(IntrahostError):
    """A disk image cannot be opened or used as asked."""


class DiskLockedError(DiskImageError):
    """Another VMM holds the disk image (its lock conflicts with ours)."""


class DiskImage:
    """An open, locked raw image (see the module docstring)."""

    def __init__(self, fd: int, path: str, readonly: bool, direct: bool) -> None:
        """Adopt ``fd`` (owned from now on), already locked."""
        self.fd = fd
        self.path = path
        self.readonly = readonly
        self.direct = direct
        try:
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(fd)
            raise DiskImageError(f"cannot size disk image {path}: {e.strerror}") from None

    @classmethod
    def open(cls, path: str, readonly: bool = False, direct: bool = False) -> DiskImage:
        """Open and lock the image at ``path``; DiskImageError / DiskLockedError (one line
        each) when it cannot be."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise DiskImageError(
                    f"disk image {path}: its file system does not support direct=on (O_DIRECT)"
                ) from None
            raise DiskImageError(f"cannot open disk image {path}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise DiskImageError(f"disk image {path} is not a regular file or block device")
            lock_image(fd, path, readonly)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, readonly, direct)

    @classmethod
    def from_fd(cls, fd: int, path: str, readonly: bool = False, direct: bool = False) -> DiskImage:
        """Adopt an fd inherited from another VMM: its open file description holds the lock
        already, so nothing is opened or locked."""
        return cls(fd, path, readonly, direct)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def lock_image(fd: int, path: str, readonly: bool) -> None:
    """Take an OFD lock on the whole image: shared for a read-only disk, else exclusive."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    # struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (0 for OFD locks).
    flock = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise DiskLockedError(
                f"disk image {path} is in use by another VMM (it holds a lock on the image)"
            ) from None
        raise DiskImageError(f"cannot lock disk image {path}: {e.strerror}") from None


@dataclass
class BlockStats:
    """Per-disk counters, with QEMU's names (``query-block``)."""

    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    rd_bytes: int = 0
    wr_bytes: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    invalid_operations: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_COUNT = 2**63 - 1


@dataclass(frozen=True)
class BlockStatsState(JsonRecord, label="virtio-blk counters", error=VirtioStateError):
    """The counters in the saved state (the device component's ``backend`` part), so that
    ``query-block`` counts the whole life of the guest across hand-offs. Every field has a
    default: a counter an older VMM did not save reads as zero."""

    rd_operations: int = bounded(_COUNT, default=0)
    wr_operations: int = bounded(_COUNT, default=0)
    flush_operations: int = bounded(_COUNT, default=0)
    rd_bytes: int = bounded(_COUNT, default=0)
    wr_bytes: int = bounded(_COUNT, default=0)
    failed_rd_operations: int = bounded(_COUNT, default=0)
    failed_wr_operations: int = bounded(_COUNT, default=0)
    failed_flush_operations: int = bounded(_COUNT, default=0)
    invalid_operations: int = bounded(_COUNT, default=0)


class VirtioBlock:
    """The virtio-blk backend of a :class:`~intrahost.vmm.devices.virtio.mmio.VirtioMmioDevice`."""

    device_id = VIRTIO_ID_BLOCK
    queue_count = 1

    def __init__(self, image: DiskImage, disk_id: str) -> None:
        self.image = image
        self.disk_id = disk_id
        self.readonly = image.readonly
        self.features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if image.readonly:
            self.features |= VIRTIO_BLK_F_RO
        self.stats = BlockStats()
        self._id = disk_id.encode()[:ID_BYTES]
        self._errors_logged = 0

    @property
    def capacity(self) -> int:
        """The image size in 512-byte sectors (a partial last sector is not reachable)."""
        return self.image.size // SECTOR

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.capacity, 0, SEG_MAX, 0, SECTOR, 0)

    def host_fds(self) -> dict[str, int]:
        return {"image": self.image.fd}

    def close(self) -> None:
        self.image.close()

    # --- state (the transport's BackendState) -------------------------------------------------

    def save_state(self) -> bytes:
        return BlockStatsState(**self.stats.to_dict()).to_json()

    def load_state(self, payload: bytes | None, where: str) -> Callable[[], None]:
        """The saved counters (zero when the state has none); applied by the returned
        callable."""
        if payload is None:
            counters = BlockStatsState()
        else:
            counters = BlockStatsState.from_dict(
                json_object(where, payload), where=f"component {where!r}"
            )

        def apply() -> None:
            self.stats = BlockStats(**counters.to_dict())

        return apply

    # --- requests ----------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int:
        """Serve one request; returns the bytes written into its device-writable part."""
        readable, writable = chain.readable, chain.writable
        if chain.readable_len < _HEADER.size or not chain.writable_len:
            raise QueueError(
                f"virtio-blk request at head {chain.head} lacks its 16-byte header or its "
                "status byte"
            )
        first = readable[0]
        if len(first) == _HEADER.size:  # the usual layout: the header in a buffer of its own
            header, data_out = bytes(first), readable[1:]
        else:
            header, data_out = _split(readable, _HEADER.size)
        kind, _reserved, sector = _HEADER.unpack(header)
        last = writable[-1]
        status_view = last[len(last) - 1 :]
        data_in = writable[:-1]
        if len(last) > 1:
            data_in.append(last[: len(last) - 1])
        in_len = chain.writable_len - 1
        if kind == VIRTIO_BLK_T_IN:
            status, written = self._read(sector, data_in, in_len)
        elif kind == VIRTIO_BLK_T_OUT:
            status, written = self._write(sector, data_out, chain.readable_len - _HEADER.size), 0
        elif kind == VIRTIO_BLK_T_FLUSH:
            status, written = self._flush(), 0
        elif kind == VIRTIO_BLK_T_GET_ID:
            written = _copy_into(data_in, self._id)
            status = VIRTIO_BLK_S_OK
        else:
            self.stats.invalid_operations += 1
            status, written = VIRTIO_BLK_S_UNSUPP, 0
        status_view[0] = status
        return written + 1

    def _in_bounds(self, sector: int, length: int) -> bool:
        return (
            length % SECTOR == 0
            and sector <= _MAX_SECTOR
            and sector * SECTOR + length <= self.image.size
        )

    def _read(self, sector: int, bufs: list[memoryview], length: int) -> tuple[int, int]:
        stats = self.stats
        stats.rd_operations += 1
        if not self._in_bounds(sector, length):
            stats.failed_rd_operations += 1
            self._log_error("read", sector, length, "beyond the image end or not whole sectors")
            return VIRTIO_BLK_S_IOERR, 0
        try:
            if self.image.direct and not _aligned(bufs):
                done = self._bounce_read(bufs, sector * SECTOR, length)
            else:
                done = os.preadv(self.image.fd, bufs, sector * SECTOR) if bufs else 0
        except OSError as e:
            stats.failed_rd_operations += 1
            self._log_error("read", sector, length, e.strerror or str(e))
            return VIRTIO_BLK_S_IOERR, 0
        if done != length:
            stats.failed_rd_operations += 1
            self._log_error("read", sector, length, f"short read of {done} bytes")
            return VIRTIO_BLK_S_IOERR, 0
        stats.rd_bytes += length
        return VIRTIO_BLK_S_OK, length

    def _write(self, sector: int, bufs: list[memoryview], length: int) -> int:
        stats = self.stats
        stats.wr_operations += 1
        if self.readonly:
            stats.failed_wr_operations += 1
            self._log_error("write", sector, length, "the disk is read-only")
            return VIRTIO_BLK_S_IOERR
        if not self._in_bounds(sector, length):
            stats.failed_wr_operations += 1
            self._log_error("write", sector, length, "beyond the image end or not whole sectors")
            return VIRTIO_BLK_S_IOERR
        try:
            if self.image.direct and not _aligned(bufs):
                done = self._bounce_write(bufs, sector * SECTOR, length)
            else:
                done = os.pwritev(self.image.fd, bufs, sector * SECTOR) if bufs else 0
        except OSError as e:
            stats.failed_wr_operations += 1
            self._log_error("write", sector, length, e.strerror or str(e))
            return VIRTIO_BLK_S_IOERR
        if done != length:
            stats.failed_wr_operations += 1
            self._log_error("write", sector, length, f"short write of {done} bytes")
            return VIRTIO_BLK_S_IOERR
        stats.wr_bytes += length
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        self.stats.flush_operations += 1
        try:
            os.fdatasync(self.image.fd)
        except OSError as e:
            self.stats.failed_flush_operations += 1
            self._log_error("flush", 0, 0, e.strerror or str(e))
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    # The bounce buffers are page-aligned anonymous mappings, unmapped when the last view
    # of them goes (at the return: nothing keeps one).

    def _bounce_read(self, bufs: list[memoryview], offset: int, length: int) -> int:
        bounce = memoryview(mmap.mmap(-1, length))
        done = os.preadv(self.image.fd, [bounce], offset)
        _copy_into(bufs, bounce[:done])
        return done

    def _bounce_write(self, bufs: list[memoryview], offset: int, length: int) -> int:
        bounce = memoryview(mmap.mmap(-1, length))
        at = 0
        for b in bufs:
            bounce[at : at + len(b)] = b
            at += len(b)
        return os.pwritev(self.image.fd, [bounce], offset)

    def _log_error(self, what: str, sector: int, length: int, reason: str) -> None:
        if self._errors_logged < ERROR_LOG_LIMIT:
            self._errors_logged += 1
            log.warning(
                "disk %s: %s of %d bytes at sector %d failed: %s%s",
                self.disk_id,
                what,
                length,
                sector,
                reason,
                " (further errors are only counted)"
                if self._errors_logged == ERROR_LOG_LIMIT
                else "",
            )

    # --- queries ---------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """This disk in ``query-block``'s shape (QEMU's names)."""
        image = self.image
        return {
            "device": self.disk_id,
            "removable": False,
            "locked": True,
            "inserted": {
                "file": image.path,
                "ro": image.readonly,
                "drv": "raw",
                "direct": image.direct,
                "image": {"filename": image.path, "format": "raw", "virtual-size": image.size},
            },
            "stats": self.stats.to_dict(),
        }


def _split(bufs: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first ``n`` bytes of ``bufs`` (which hold at least that many), and the rest."""
    head = bytearray()
    rest: list[memoryview] = []
    for i, b in enumerate(bufs):
        need = n - len(head)
        if need >= len(b):
            head += b
            continue
        head += b[:need]
        rest.append(b[need:])
        rest.extend(bufs[i + 1 :])
        break
    return bytes(head), rest


def _copy_into(bufs: list[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into consecutive buffers (as much as fits); returns the bytes copied."""
    at = 0
    for b in bufs:
        if at >= len(data):
            break
        n = min(len(b), len(data) - at)
        b[:n] = data[at : at + n]
        at += n
    return at


def _aligned(bufs: list[memoryview]) -> bool:
    """True when every buffer's address and length suit O_DIRECT."""
    for b in bufs:
        if len(b) % DIRECT_ALIGN:
            return False
        address = ctypes.addressof(ctypes.c_char.from_buffer(b))
        if address % DIRECT_ALIGN:
            return False
    return True
