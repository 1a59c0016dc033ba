"""The fixed ABI of the built-in guests, and host-side readers of their memory.

Every address, port and number here is also written into the guest sources
(``src/common.inc``; ``src/disk.h`` and ``src/net.h`` for the C guests) and described in
``docs/guests.md``;
change all three together.

The readers take any bytes-like view of guest RAM in which guest-physical address ``A`` is
at index ``A`` (an ``mmap`` of the guest memory, a ``bytes`` copy, a ``memoryview``).
:func:`verify_region` is meant for a *paused* guest: on a running one the words move under
it. :func:`read_status` may be called at any time; the values are then a snapshot of words
that were each read atomically, not of the page as a whole.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from intrahost.errors import IntrahostError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

# --- loading -------------------------------------------------------------------------------------

#: Where a guest image is loaded (multiboot ELF segments, or a raw binary).
IMAGE_BASE = 0x100000
#: The multiboot header must lie in this many first bytes of the image file.
MULTIBOOT_SEARCH_BYTES = 8192
#: The multiboot information structure written by the loader, and what follows it.
MBI_ADDR = 0x9000
MBI_MMAP_ADDR = 0x9100
MBI_LOADER_NAME_ADDR = 0x9700
CMDLINE_ADDR = 0x9800
#: The command line, including its terminating NUL, fits in this many bytes.
CMDLINE_MAX = 1024
#: The loader owns [MBI_ADDR, MBI_END); a guest must not write there before parsing it.
MBI_END = 0xA000

# --- SMP start-up --------------------------------------------------------------------------------

#: The counter guest copies its real-mode AP trampoline here ...
AP_TRAMPOLINE_ADDR = 0x8000
#: ... and starts the APs with this SIPI vector (start address = vector << 12).
SIPI_VECTOR = AP_TRAMPOLINE_ADDR >> 12
LAPIC_BASE = 0xFEE00000
MAX_VCPUS = 64

# --- devices -------------------------------------------------------------------------------------

UART_BASE = 0x3F8
UART_LSR = UART_BASE + 5
UART_LSR_THRE = 0x20

DEBUG_PORT_BASE = 0x500
DEBUG_PORT_TAG = DEBUG_PORT_BASE + 0x0  # out eax: latch a 32-bit report tag
DEBUG_PORT_VALUE_LO = DEBUG_PORT_BASE + 0x4  # out eax: latch the low 32 bits of the value
DEBUG_PORT_VALUE_HI = DEBUG_PORT_BASE + 0x8  # out eax: high 32 bits; commits the report
DEBUG_PORT_EXIT = DEBUG_PORT_BASE + 0xC  # out al: end the run with this exit code
#: The vCPU index goes in tag bits 16-23.
REPORT_VCPU_SHIFT = 16


class ReportTag(enum.IntEnum):
    """The low 16 bits of a debug-port report tag."""

    COUNTER = 1  # value: the vCPU's counter when it reached the limit
    MAX_GAP = 2  # value: its max_gap (TSC ticks)
    CHECKSUM = 3  # value: its region checksum
    HELLO = 4  # value: HELLO_VALUE (the hello guest)
    FAULT = 5  # value: exception vector | error code << 32
    FAULT_RIP = 6  # value: the faulting RIP
    ERROR = 7  # value: the exit code the guest is about to write (a set-up error)
    DISK_WRITES = 8  # disk guest, at the end: writes completed
    DISK_READS = 9  # verify reads completed
    DISK_VERIFY_FAILURES = 10  # verify reads that did not find the last completed write
    DISK_IO_ERRORS = 11  # requests the device completed with a status other than OK


class ExitCode(enum.IntEnum):
    """What the guests write to :data:`DEBUG_PORT_EXIT`."""

    OK = 0
    BAD_CMDLINE = 1  # unknown key or bad value; the UART line names it
    NO_MEMORY = 2  # RAM too small for cpus= / sweep=
    AP_TIMEOUT = 3  # fewer vCPUs came up than cpus= asked for
    NOT_MULTIBOOT = 4  # not entered with EAX = 0x2BADB002
    FAULT = 5  # a CPU exception; FAULT and FAULT_RIP were reported
    NO_DEVICE = 6  # disk/net guest: no usable virtio-blk/virtio-net device on the command line
    DEVICE_ERROR = 7  # the device refused the driver (features, queue, read-only, too small)
    IO_ERROR = 8  # a request completed with a status other than OK
    VERIFY_FAILED = 9  # a block read back did not carry the last write seen complete there


#: The hello guest's HELLO report value: ASCII "HELLO".
HELLO_VALUE = 0x48454C4C4F
HELLO_TEXT = "Hello from intrahost\n"


def report_tag(tag: ReportTag | int, vcpu: int) -> int:
    """The 32-bit tag a guest on ``vcpu`` writes to report ``tag``."""
    if not 0 <= vcpu <= 0xFF:
        raise GuestLayoutError(f"vCPU index {vcpu} does not fit in the 8-bit tag field")
    return (vcpu << REPORT_VCPU_SHIFT) | int(tag)


def split_report_tag(raw: int) -> tuple[int, int]:
    """``(tag, vcpu)`` of a raw 32-bit tag; ``tag`` equals a :class:`ReportTag` if known."""
    return raw & 0xFFFF, (raw >> REPORT_VCPU_SHIFT) & 0xFF


# --- the counter guest ---------------------------------------------------------------------------

STATUS_ADDR = 0x200000
STATUS_MAGIC = b"IHCNTR01"
STATUS_MAGIC_U64 = int.from_bytes(STATUS_MAGIC, "little")
# Header offsets.
STATUS_CPUS = 8  # u32: vCPUs the guest was asked to run
STATUS_RUNNING = 12  # u32: vCPUs that reached the CPL3 loop
STATUS_PROGRESS = 16  # u64: progress-line interval (iterations)
STATUS_LIMIT = 24  # u64: iteration limit, 0 = run forever

SLOTS_ADDR = STATUS_ADDR + 0x100
SLOT_SIZE = 64
# Slot offsets.
SLOT_COUNTER = 0  # u64: iterations done
SLOT_MAX_GAP = 8  # u64: largest gap between two consecutive loop RDTSCs (ticks)
SLOT_LAST_TSC = 16  # u64: the latest loop RDTSC
SLOT_CHECKSUM = 24  # u64: sum of the region's words, mod 2^64
SLOT_LINES = 32  # u64: progress lines printed
SLOT_GAPS = 40  # u64: large gaps recorded so far (entries written to the vCPU's gap ring)
STATUS_END = SLOTS_ADDR + MAX_VCPUS * SLOT_SIZE
#: Per vCPU, a ring of its latest large gaps: GAP_ENTRIES x (u64 gap ticks, u64 the RDTSC that
#: ended it), entry ``n % GAP_ENTRIES`` for the n-th gap. A gap is large when it exceeds
#: GAP_MIN_TICKS (about 60 µs at 2 GHz; the loop itself takes a few ns per iteration, a busy
#: host takes the vCPU away for longer ones often: the ring holds the last 128).
GAPS_ADDR = STATUS_ADDR + 0x2000
GAPS_STRIDE = 0x800
GAP_ENTRIES = 128
GAP_MIN_TICKS = 0x20000
GAPS_END = GAPS_ADDR + MAX_VCPUS * GAPS_STRIDE

REGION_ADDR = 0x400000
REGION_STRIDE = 0x10000
REGION_WORDS = 8192
REGION_END = REGION_ADDR + MAX_VCPUS * REGION_STRIDE
#: Iteration c stores c * REGION_MULTIPLIER (mod 2^64) in word c % REGION_WORDS.
REGION_MULTIPLIER = 0x9E3779B97F4A7C15

#: sweep=M touches one byte per 4 KiB page of [SWEEP_ADDR, SWEEP_ADDR + M MiB).
SWEEP_ADDR = 0x1000000
SWEEP_PAGE = 0x1000

DEFAULT_PROGRESS = 1 << 26

_U64_MASK = (1 << 64) - 1
_HEADER = struct.Struct("<QIIQQ")
_SLOT = struct.Struct("<QQQQQQ")
_GAP_RING = struct.Struct(f"<{2 * GAP_ENTRIES}Q")
_REGION = struct.Struct(f"<{REGION_WORDS}Q")
_U64 = struct.Struct("<Q")


class GuestLayoutError(IntrahostError):
    """A guest-memory helper was used outside the layout (vCPU index, memory size)."""


class GuestStatusMissing(IntrahostError):
    """Guest memory holds no counter-guest status page (yet, or it is not that guest)."""


class GuestMemoryCorrupt(IntrahostError):
    """The counter guest's memory is not what its own counters say it must be."""


@dataclass(frozen=True)
class VcpuSlot:
    """One vCPU's slot of the status page."""

    counter: int
    max_gap: int
    last_tsc: int
    checksum: int
    progress_lines: int
    gaps_recorded: int = 0


@dataclass(frozen=True)
class CounterStatus:
    """The counter guest's status page; ``slots`` has one entry per requested vCPU."""

    cpus: int
    running: int
    progress: int
    limit: int
    slots: tuple[VcpuSlot, ...]

    @property
    def total(self) -> int:
        """Iterations done by all vCPUs together."""
        return sum(slot.counter for slot in self.slots)


def region_addr(vcpu: int) -> int:
    """Guest-physical address of ``vcpu``'s write region."""
    _check_vcpu(vcpu)
    return REGION_ADDR + REGION_STRIDE * vcpu


def slot_addr(vcpu: int) -> int:
    """Guest-physical address of ``vcpu``'s status slot."""
    _check_vcpu(vcpu)
    return SLOTS_ADDR + SLOT_SIZE * vcpu


def region_value(iteration: int) -> int:
    """The word iteration ``iteration`` (>= 1) stores."""
    return (iteration * REGION_MULTIPLIER) & _U64_MASK


def expected_region(counter: int) -> list[int]:
    """Every word of a region after ``counter`` iterations (0 where none wrote yet)."""
    words = [0] * REGION_WORDS
    first = max(1, counter - REGION_WORDS + 1)
    for iteration in range(first, counter + 1):
        words[iteration % REGION_WORDS] = region_value(iteration)
    return words


def read_slot(mem: ReadableBuffer, vcpu: int) -> VcpuSlot:
    """``vcpu``'s slot, whether or not the guest has started."""
    address = slot_addr(vcpu)
    with _byte_view(mem, STATUS_END) as view:
        return VcpuSlot(*_SLOT.unpack_from(view, address))


def read_status(mem: ReadableBuffer) -> CounterStatus:
    """The status page. Raises :class:`GuestStatusMissing` if the magic is not there."""
    with _byte_view(mem, STATUS_END) as view:
        magic, cpus, running, progress, limit = _HEADER.unpack_from(view, STATUS_ADDR)
        slots = tuple(
            VcpuSlot(*_SLOT.unpack_from(view, SLOTS_ADDR + SLOT_SIZE * i))
            for i in range(min(cpus, MAX_VCPUS))
        )
    if magic != STATUS_MAGIC_U64:
        found = _U64.pack(magic)
        raise GuestStatusMissing(
            f"no counter guest status at {STATUS_ADDR:#x}: magic is {found!r}, not "
            f"{STATUS_MAGIC!r} (the guest has not started yet, or it is not the counter guest)"
        )
    return CounterStatus(cpus=cpus, running=running, progress=progress, limit=limit, slots=slots)


@dataclass(frozen=True)
class Gap:
    """A large gap of one vCPU's loop: ``ticks`` long, ended by the RDTSC ``end``."""

    ticks: int
    end: int

    @property
    def start(self) -> int:
        return self.end - self.ticks


def read_gaps(mem: ReadableBuffer, vcpu: int) -> list[Gap]:
    """``vcpu``'s latest large gaps, oldest first (at most :data:`GAP_ENTRIES`), read while
    the guest may be writing: an entry overwritten during the read is left out."""
    count_at = slot_addr(vcpu) + SLOT_GAPS
    ring_at = GAPS_ADDR + GAPS_STRIDE * vcpu
    with _byte_view(mem, GAPS_END) as view:
        (before,) = _U64.unpack_from(view, count_at)
        words = _GAP_RING.unpack_from(view, ring_at)
        (after,) = _U64.unpack_from(view, count_at)
    # Entries before..after-1 may have been rewritten during the read; valid ones are the
    # n-th gaps for max(0, after - GAP_ENTRIES) <= n < before.
    first = max(0, after - GAP_ENTRIES)
    gaps = []
    for n in range(first, before):
        i = n % GAP_ENTRIES
        gaps.append(Gap(words[2 * i], words[2 * i + 1]))
    return gaps


def reset_max_gap(mem: WriteableBuffer, vcpu: int) -> None:
    """Zero ``vcpu``'s max_gap; the running guest re-reads it every iteration."""
    address = slot_addr(vcpu) + SLOT_MAX_GAP
    with _byte_view(mem, STATUS_END) as view:
        if view.readonly:
            raise GuestLayoutError("reset_max_gap needs a writable view of guest memory")
        _U64.pack_into(view, address, 0)


def verify_region(mem: ReadableBuffer, vcpu: int) -> None:
    """Check ``vcpu``'s region and checksum against its counter, in a paused guest.

    A guest stores, per iteration c, the region word, then the checksum, then the counter.
    So with counter n in memory, iteration n + 1 may be partly stored: its word may already
    hold the new value, and if it does, the checksum may already include it. Anything else
    raises :class:`GuestMemoryCorrupt` naming the first bad word.
    """
    base = region_addr(vcpu)
    with _byte_view(mem, base + REGION_STRIDE) as view:
        slot = VcpuSlot(*_SLOT.unpack_from(view, slot_addr(vcpu)))
        words = _REGION.unpack_from(view, base)
    counter = slot.counter
    expected = expected_region(counter)
    in_flight = (counter + 1) % REGION_WORDS
    next_value = region_value(counter + 1)

    for index, (word, want) in enumerate(zip(words, expected, strict=True)):
        if word == want or (index == in_flight and word == next_value):
            continue
        alternative = ""
        if index == in_flight:
            alternative = f" (or {next_value:#018x} from iteration {counter + 1})"
        raise GuestMemoryCorrupt(
            f"vCPU {vcpu}: region word {index} at {base + 8 * index:#x} is {word:#018x}, "
            f"expected {want:#018x} for counter {counter}{alternative}"
        )

    settled = sum(expected) & _U64_MASK
    allowed = [settled]
    if words[in_flight] == next_value != expected[in_flight]:
        allowed.append((settled - expected[in_flight] + next_value) & _U64_MASK)
    if slot.checksum not in allowed:
        raise GuestMemoryCorrupt(
            f"vCPU {vcpu}: checksum at {slot_addr(vcpu) + SLOT_CHECKSUM:#x} is "
            f"{slot.checksum:#018x}, expected "
            + " or ".join(f"{value:#018x}" for value in allowed)
            + f" for counter {counter}"
        )


# --- the disk guest ------------------------------------------------------------------------------

#: The disk guest's status page (the counter guest's address; the magic tells them apart).
DISK_STATUS_ADDR = STATUS_ADDR
DISK_STATUS_MAGIC = b"IHDISK01"
DISK_STATUS_MAGIC_U64 = int.from_bytes(DISK_STATUS_MAGIC, "little")
#: The virtqueue: descriptor table, avail ring at +0x1000, used ring at +0x2000.
DISK_QUEUE_ADDR = 0x300000
#: One request slot per request in flight: a 16-byte virtio-blk header, the status at +16.
DISK_REQUESTS_ADDR = 0x303000
DISK_REQUEST_SIZE = 32
#: One 4 KiB data buffer per request slot.
DISK_BUFFERS_ADDR = 0x400000
#: u64 per block: the sequence number of the last write to it the guest saw complete (0: none).
DISK_SEQ_TABLE_ADDR = 0x800000

#: The status page's u64 fields, in order (offset = 8 * index).
DISK_STATUS_FIELDS = (
    "magic",
    "state",
    "exit_code",
    "device_base",
    "capacity",
    "blocks",
    "inflight",
    "flush",
    "verify",
    "limit",
    "progress",
    "generation",
    "queue_size",
    "features",
    "writes_submitted",
    "writes_completed",
    "reads_completed",
    "verify_failures",
    "flushes",
    "io_errors",
    "max_completed",
    "durable",
    "tsc_start",
    "tsc_now",
    "kicks",
    "last_failure",
    "max_completion_gap",
    "max_loop_gap",
    "duplicates",
    "bench",
)
DISK_STATUS_SIZE = 256

#: The block the disk guest writes: 4 KiB, a 64-byte header, payload words.
DISK_BLOCK_SIZE = 4096
DISK_SECTORS_PER_BLOCK = DISK_BLOCK_SIZE // 512
DISK_BLOCK_MAGIC = b"IHDSKBLK"
DISK_BLOCK_MAGIC_U64 = int.from_bytes(DISK_BLOCK_MAGIC, "little")
BLK_MAGIC = 0  # u64
BLK_GENERATION = 8  # u64: the run's generation
BLK_BLOCK = 16  # u64: the block's own index
BLK_SEQ = 24  # u64: the write's sequence number (from 1)
BLK_BLOCKS = 32  # u64: the run's block count; sequence s goes to block (s - 1) % blocks
BLK_CRC = 40  # u32: zlib CRC-32 of the whole block with these 4 bytes zero
BLK_HEADER_SIZE = 64  # bytes 44-63 are zero
#: Payload word i (8 <= i < 512) = generation ^ (seq * MUL_SEQ + i * MUL_WORD) mod 2^64.
PAYLOAD_MUL_SEQ = 0x9E3779B97F4A7C15
PAYLOAD_MUL_WORD = 0xD6E8FEB86659FD93

DISK_DEFAULT_INFLIGHT = 8
DISK_DEFAULT_FLUSH = 64
DISK_DEFAULT_VERIFY = 1
DISK_DEFAULT_PROGRESS = 65536

_DISK_STATUS = struct.Struct(f"<{len(DISK_STATUS_FIELDS)}Q")


class DiskState(enum.IntEnum):
    """The disk guest's ``state`` field."""

    STARTING = 0  # parsing, finding and setting up the device
    RUNNING = 1  # the workload runs
    FINISHED = 2  # limit reached; exit_code says how it went
    FAILED = 3  # set-up failed; exit_code says why


@dataclass(frozen=True)
class DiskStatus:
    """The disk guest's status page (see docs/guests.md for each field)."""

    state: int
    exit_code: int
    device_base: int
    capacity: int
    blocks: int
    inflight: int
    flush: int
    verify: int
    limit: int
    progress: int
    generation: int
    queue_size: int
    features: int
    writes_submitted: int
    writes_completed: int
    reads_completed: int
    verify_failures: int
    flushes: int
    io_errors: int
    max_completed: int
    durable: int
    tsc_start: int
    tsc_now: int
    kicks: int
    last_failure: int
    max_completion_gap: int
    max_loop_gap: int
    duplicates: int
    bench: int


def read_disk_status(mem: ReadableBuffer) -> DiskStatus:
    """The disk guest's status page. Raises :class:`GuestStatusMissing` without its magic."""
    with _byte_view(mem, DISK_STATUS_ADDR + DISK_STATUS_SIZE) as view:
        magic, *fields = _DISK_STATUS.unpack_from(view, DISK_STATUS_ADDR)
    if magic != DISK_STATUS_MAGIC_U64:
        raise GuestStatusMissing(
            f"no disk guest status at {DISK_STATUS_ADDR:#x}: magic is {_U64.pack(magic)!r}, "
            f"not {DISK_STATUS_MAGIC!r} (the guest has not started yet, or it is not the "
            "disk guest)"
        )
    return DiskStatus(*fields)


#: The disk guest's ``bench`` field: its workload (see docs/guests.md).
DISK_BENCH_NONE = 0
DISK_BENCH_RANDWRITE = 1
DISK_BENCH_RANDREAD = 2


def reset_disk_gaps(mem: WriteableBuffer) -> None:
    """Zero the disk guest's ``max_completion_gap`` and ``max_loop_gap``, so that the next
    ones it records are the pause to measure (it re-reads them every time: a race with the
    running guest is harmless)."""
    with _byte_view(mem, DISK_STATUS_ADDR + DISK_STATUS_SIZE) as view:
        if view.readonly:
            raise GuestLayoutError("reset_disk_gaps needs a writable view of guest memory")
        for name in ("max_completion_gap", "max_loop_gap"):
            _U64.pack_into(view, DISK_STATUS_ADDR + 8 * DISK_STATUS_FIELDS.index(name), 0)


def read_disk_seq_table(mem: ReadableBuffer, blocks: int) -> tuple[int, ...]:
    """The first ``blocks`` entries of the disk guest's sequence table."""
    end = DISK_SEQ_TABLE_ADDR + 8 * blocks
    with _byte_view(mem, end) as view:
        return struct.unpack_from(f"<{blocks}Q", view, DISK_SEQ_TABLE_ADDR)


# --- the net guest -------------------------------------------------------------------------------

#: The net guest's status page (the counter guest's address; the magic tells them apart).
NET_STATUS_ADDR = STATUS_ADDR
NET_STATUS_MAGIC = b"IHNET001"
NET_STATUS_MAGIC_U64 = int.from_bytes(NET_STATUS_MAGIC, "little")
#: The receiveq and the transmitq: descriptor table, avail ring at +0x1000, used ring at +0x2000.
NET_RXQ_ADDR = 0x300000
NET_TXQ_ADDR = 0x304000
#: Receive and transmit buffer i at +NET_BUFFER_SIZE * i: the 12-byte virtio_net_hdr, the frame.
NET_RX_BUFFERS_ADDR = 0x400000
NET_TX_BUFFERS_ADDR = 0x500000
NET_BUFFER_SIZE = 2048
NET_HDR_SIZE = 12
#: The UDP port whose datagrams the guest sends back.
NET_ECHO_PORT = 7
NET_DEFAULT_PREFIX = 24
NET_DEFAULT_PROGRESS = 0

#: The status page's u64 fields, in order (offset = 8 * index).
NET_STATUS_FIELDS = (
    "magic",
    "state",
    "exit_code",
    "device_base",
    "ip",
    "prefix",
    "mac",
    "features",
    "link_status",
    "rx_queue_size",
    "tx_queue_size",
    "progress",
    "heartbeat",
    "tsc_start",
    "tsc_now",
    "frames_in",
    "frames_out",
    "arp_replies",
    "icmp_echoes",
    "udp_echoes",
    "dropped",
    "errors",
    "rx_kicks",
    "tx_kicks",
    "duplicates",
    "max_loop_gap",
)
NET_STATUS_SIZE = 256

_NET_STATUS = struct.Struct(f"<{len(NET_STATUS_FIELDS)}Q")


class NetState(enum.IntEnum):
    """The net guest's ``state`` field."""

    STARTING = 0  # parsing, finding and setting up the device
    RUNNING = 1  # answering
    FAILED = 2  # set-up failed; exit_code says why


@dataclass(frozen=True)
class NetStatus:
    """The net guest's status page (see docs/guests.md for each field)."""

    state: int
    exit_code: int
    device_base: int
    ip: int
    prefix: int
    mac: int
    features: int
    link_status: int
    rx_queue_size: int
    tx_queue_size: int
    progress: int
    heartbeat: int
    tsc_start: int
    tsc_now: int
    frames_in: int
    frames_out: int
    arp_replies: int
    icmp_echoes: int
    udp_echoes: int
    dropped: int
    errors: int
    rx_kicks: int
    tx_kicks: int
    duplicates: int
    max_loop_gap: int

    @property
    def address(self) -> str:
        """The guest's address and prefix, ``A.B.C.D/P``."""
        return ".".join(str(self.ip >> s & 0xFF) for s in (24, 16, 8, 0)) + f"/{self.prefix}"

    @property
    def mac_address(self) -> str:
        """Its MAC, ``aa:bb:cc:dd:ee:ff``."""
        return ":".join(f"{b:02x}" for b in self.mac.to_bytes(8, "little")[:6])


def read_net_status(mem: ReadableBuffer) -> NetStatus:
    """The net guest's status page. Raises :class:`GuestStatusMissing` without its magic."""
    with _byte_view(mem, NET_STATUS_ADDR + NET_STATUS_SIZE) as view:
        magic, *fields = _NET_STATUS.unpack_from(view, NET_STATUS_ADDR)
    if magic != NET_STATUS_MAGIC_U64:
        raise GuestStatusMissing(
            f"no net guest status at {NET_STATUS_ADDR:#x}: magic is {_U64.pack(magic)!r}, "
            f"not {NET_STATUS_MAGIC!r} (the guest has not started yet, or it is not the "
            "net guest)"
        )
    return NetStatus(*fields)


def _check_vcpu(vcpu: int) -> None:
    if not 0 <= vcpu < MAX_VCPUS:
        raise GuestLayoutError(f"vCPU index {vcpu} is outside 0..{MAX_VCPUS - 1}")


@contextlib.contextmanager
def _byte_view(mem: ReadableBuffer, needed: int) -> Iterator[memoryview]:
    """A flat byte view of ``mem``, released on exit (so an mmap can be closed afterwards)."""
    with memoryview(mem) as raw, raw.cast("B") as view:
        if len(view) < needed:
            raise GuestLayoutError(
                f"guest memory of {len(view):#x} bytes ends before {needed:#x}: "
                "the counter guest needs at least 8 MiB of RAM, the net guest 6 MiB, the disk "
                "guest 8 MiB plus "
                "8 bytes per block"
            )
        yield view
