"""The buses: which device answers which x86 I/O port (:class:`IoBus`) and which
guest-physical MMIO address (:class:`MmioBus`).

The vCPU run loop hands every port I/O exit to :meth:`IoBus.dispatch` and every MMIO exit to
:meth:`MmioBus.dispatch`, from several vCPU threads at once. A bus takes no lock on that path:
its range table is an immutable tuple that ``register`` replaces as a whole, so a reader
always sees either the old table or the new one. Devices guard their own state with their own
lock.

``dispatch`` completes a read exit (``in``, MMIO load) before it returns, as it must be before
the vCPU's next KVM_RUN: KVM copies the data into the guest register at that next entry.

Devices receive the absolute port number or address (not an offset), so one device class can
sit at several bases (COM1 at 0x3F8, COM2 at 0x2F8) by being told its base.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol, TypeVar

from intrahost.errors import IntrahostError
from intrahost.kvm import MmioRead, MmioWrite, PortIn, PortOut

log = logging.getLogger(__name__)

#: The x86 I/O space: ports 0x0000..0xFFFF.
PORT_SPACE = 0x10000

#: Access sizes an ``in``/``out`` instruction can have.
ACCESS_SIZES = (1, 2, 4)

#: How many distinct unclaimed ports are logged at WARNING before the rest go to DEBUG.
UNCLAIMED_WARN_LIMIT = 32

#: Guest-physical addresses: 0 .. 2**64 - 1.
ADDRESS_SPACE = 1 << 64

#: Access sizes an MMIO exit can have (KVM splits wider accesses).
MMIO_ACCESS_SIZES = (1, 2, 3, 4, 5, 6, 7, 8)

#: How many distinct unclaimed MMIO addresses are logged (once each); later ones are only
#: counted, so a guest probing memory cannot grow the set without bound.
MMIO_UNCLAIMED_WARN_LIMIT = 64


class IoBusError(IntrahostError):
    """A device could not be placed on the I/O bus, or an access was malformed."""


class MmioBusError(IntrahostError):
    """A device could not be placed on the MMIO bus, or an access was malformed."""


class PioDevice(Protocol):
    """A device reachable through x86 port I/O.

    ``port`` is the absolute port; ``size`` is 1, 2 or 4 bytes. ``pio_read`` returns a value
    that fits in ``size`` bytes. Both may be called from several vCPU threads at once.
    """

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class PortRange:
    """Ports ``base`` .. ``base + length - 1`` belong to ``device``."""

    base: int
    length: int
    device: PioDevice
    name: str

    @property
    def end(self) -> int:
        """One past the last port of the range."""
        return self.base + self.length

    def __str__(self) -> str:
        return f"{self.name} at {self.base:#06x}..{self.end - 1:#06x}"


class MmioDevice(Protocol):
    """A device reachable through guest-physical MMIO.

    ``address`` is absolute; ``size`` is 1 to 8 bytes and values are little-endian integers.
    ``mmio_read`` returns a value that fits in ``size`` bytes. Both may be called from several
    vCPU threads at once.
    """

    def mmio_read(self, address: int, size: int) -> int: ...

    def mmio_write(self, address: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class MmioRange:
    """Addresses ``base`` .. ``base + length - 1`` belong to ``device``."""

    base: int
    length: int
    device: MmioDevice
    name: str

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.length

    def __str__(self) -> str:
        return f"{self.name} at {self.base:#x}..{self.end - 1:#x}"


def all_ones(size: int) -> int:
    """The value a read of ``size`` bytes returns from a port nobody answers."""
    return (1 << (8 * size)) - 1


class IoBus:
    """Maps port ranges to devices; accesses to unclaimed ports are logged and ignored."""

    def __init__(self) -> None:
        # (bases, ranges), sorted by base, never overlapping. Replaced whole by register()
        # (copy-on-write), never mutated, so lock-free readers always see a consistent pair.
        self._table: tuple[tuple[int, ...], tuple[PortRange, ...]] = ((), ())
        self._register_lock = threading.Lock()
        self._unclaimed_lock = threading.Lock()
        self._unclaimed_seen: set[int] = set()
        self._unclaimed_accesses = 0

    def register(self, base: int, length: int, device: PioDevice, name: str | None = None) -> None:
        """Give ports ``base`` .. ``base + length - 1`` to ``device``.

        Raises :class:`IoBusError` if the range leaves the I/O space or overlaps a range that
        is already registered.
        """
        label = name if name is not None else type(device).__name__
        if length <= 0:
            raise IoBusError(f"cannot register {label}: length must be positive, got {length}")
        if base < 0 or base + length > PORT_SPACE:
            raise IoBusError(
                f"cannot register {label} at {base:#x} (+{length}): x86 I/O ports are "
                f"0x0000..0xffff"
            )
        new = PortRange(base, length, device, label)
        with self._register_lock:
            self._table = _with_range(self._table[1], new, IoBusError)

    @property
    def ranges(self) -> tuple[PortRange, ...]:
        """The registered ranges, sorted by base."""
        return self._table[1]

    @property
    def unclaimed_accesses(self) -> int:
        """How many accesses hit a port that no device claims."""
        return self._unclaimed_accesses

    def find(self, port: int) -> PortRange | None:
        """The range that contains ``port``, if any."""
        return _find(self._table, port)

    def read(self, port: int, size: int) -> int:
        """Execute ``in`` of ``size`` bytes at ``port``; all-ones if no device answers."""
        _check_access(port, size)
        found = self.find(port)
        if found is None:
            self._note_unclaimed(port, size, "read")
            return all_ones(size)
        return found.device.pio_read(port, size) & all_ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        """Execute ``out`` of ``size`` bytes of ``value`` at ``port``; ignored if unclaimed."""
        _check_access(port, size)
        found = self.find(port)
        if found is None:
            self._note_unclaimed(port, size, f"write of {value & all_ones(size):#x}")
            return
        found.device.pio_write(port, size, value & all_ones(size))

    def dispatch(self, access: PortIn | PortOut) -> None:
        """Carry out a port I/O exit: each of its ``count`` items in order, an ``out`` as
        :meth:`write`, an ``in`` as :meth:`read` whose values complete the exit."""
        port, size, count = access.port, access.size, access.count
        if isinstance(access, PortOut):
            data = access.data
            if count == 1:
                self.write(port, size, int.from_bytes(data, "little"))
                return
            for at in range(0, size * count, size):
                self.write(port, size, int.from_bytes(data[at : at + size], "little"))
            return
        if count == 1:
            access.complete(self.read(port, size).to_bytes(size, "little"))
            return
        access.complete(
            b"".join(self.read(port, size).to_bytes(size, "little") for _ in range(count))
        )

    def _note_unclaimed(self, port: int, size: int, what: str) -> None:
        # Rate limit: each port is logged the first time only, so a guest polling a missing
        # device cannot flood the log; after UNCLAIMED_WARN_LIMIT distinct ports, DEBUG only.
        with self._unclaimed_lock:
            self._unclaimed_accesses += 1
            if port in self._unclaimed_seen:
                return
            self._unclaimed_seen.add(port)
            seen = len(self._unclaimed_seen)
        level = logging.WARNING if seen <= UNCLAIMED_WARN_LIMIT else logging.DEBUG
        log.log(
            level,
            "unclaimed I/O port %#06x: %d-byte %s ignored (reads return all-ones); "
            "logged once per port",
            port,
            size,
            what,
        )
        if seen == UNCLAIMED_WARN_LIMIT:
            log.warning(
                "%d distinct unclaimed I/O ports seen; further ones are logged at DEBUG", seen
            )


class MmioBus:
    """Maps guest-physical address ranges to devices; accesses nobody claims are logged once
    per address and ignored, and reads of them return all ones.

    Only addresses that no memory slot backs reach the bus: KVM exits to userspace for those.
    """

    def __init__(self) -> None:
        # Same copy-on-write discipline as IoBus._table.
        self._table: tuple[tuple[int, ...], tuple[MmioRange, ...]] = ((), ())
        self._register_lock = threading.Lock()
        self._unclaimed_lock = threading.Lock()
        self._unclaimed_seen: set[int] = set()
        self._unclaimed_accesses = 0

    def register(self, base: int, length: int, device: MmioDevice, name: str | None = None) -> None:
        """Give addresses ``base`` .. ``base + length - 1`` to ``device``.

        Raises :class:`MmioBusError` if the range leaves the 64-bit address space or overlaps
        a range that is already registered.
        """
        label = name if name is not None else type(device).__name__
        if length <= 0:
            raise MmioBusError(f"cannot register {label}: length must be positive, got {length}")
        if base < 0 or base + length > ADDRESS_SPACE:
            raise MmioBusError(
                f"cannot register {label} at {base:#x} (+{length}): guest-physical addresses "
                "are 0..2**64-1"
            )
        new = MmioRange(base, length, device, label)
        with self._register_lock:
            self._table = _with_range(self._table[1], new, MmioBusError)

    @property
    def ranges(self) -> tuple[MmioRange, ...]:
        """The registered ranges, sorted by base."""
        return self._table[1]

    @property
    def unclaimed_accesses(self) -> int:
        """How many accesses hit an address that no device claims."""
        return self._unclaimed_accesses

    def find(self, address: int) -> MmioRange | None:
        """The range that contains ``address``, if any."""
        return _find(self._table, address)

    def read(self, address: int, size: int) -> int:
        """A load of ``size`` bytes at ``address``; all-ones if no device answers."""
        _check_mmio_access(address, size)
        found = self.find(address)
        if found is None:
            self._note_unclaimed(address, size, "read")
            return all_ones(size)
        return found.device.mmio_read(address, size) & all_ones(size)

    def write(self, address: int, size: int, value: int) -> None:
        """A store of ``size`` bytes of ``value`` at ``address``; ignored if unclaimed."""
        _check_mmio_access(address, size)
        found = self.find(address)
        if found is None:
            self._note_unclaimed(address, size, "write")
            return
        found.device.mmio_write(address, size, value & all_ones(size))

    def dispatch(self, access: MmioRead | MmioWrite) -> None:
        """Carry out an MMIO exit: a store as :meth:`write`, a load as :meth:`read` whose
        value completes the exit."""
        if isinstance(access, MmioWrite):
            self.write(access.address, access.length, int.from_bytes(access.data, "little"))
        else:
            size = access.length
            access.complete(self.read(access.address, size).to_bytes(size, "little"))

    def _note_unclaimed(self, address: int, size: int, what: str) -> None:
        with self._unclaimed_lock:
            self._unclaimed_accesses += 1
            seen = len(self._unclaimed_seen)
            if address in self._unclaimed_seen or seen >= MMIO_UNCLAIMED_WARN_LIMIT:
                return
            self._unclaimed_seen.add(address)
            seen += 1
        log.warning(
            "unhandled MMIO %s at %#x (%d bytes) ignored (reads return all-ones); logged once "
            "per address",
            what,
            address,
            size,
        )
        if seen == MMIO_UNCLAIMED_WARN_LIMIT:
            log.warning(
                "%d distinct unhandled MMIO addresses seen; further ones are not logged", seen
            )


class _Range(Protocol):
    @property
    def base(self) -> int: ...

    @property
    def end(self) -> int: ...


_R = TypeVar("_R", bound=_Range)


def _with_range(
    current: tuple[_R, ...], new: _R, error: type[IntrahostError]
) -> tuple[tuple[int, ...], tuple[_R, ...]]:
    """A new (bases, ranges) table: ``current`` plus ``new``, sorted by base. Raises
    ``error`` if ``new`` overlaps a range of ``current``."""
    for existing in current:
        if new.base < existing.end and existing.base < new.end:
            raise error(f"cannot register {new}: it overlaps {existing}; choose another base")
    ranges = tuple(sorted((*current, new), key=lambda r: r.base))
    return tuple(r.base for r in ranges), ranges


def _find(table: tuple[tuple[int, ...], tuple[_R, ...]], key: int) -> _R | None:
    """The range of ``table`` that contains ``key``, if any."""
    bases, ranges = table
    i = bisect.bisect_right(bases, key) - 1
    if i >= 0:
        candidate = ranges[i]
        if key < candidate.end:
            return candidate
    return None


def _check_mmio_access(address: int, size: int) -> None:
    if size not in MMIO_ACCESS_SIZES:
        raise MmioBusError(f"MMIO access of {size} bytes at {address:#x}: size must be 1 to 8")
    if not 0 <= address < ADDRESS_SPACE:
        raise MmioBusError(f"MMIO access at {address:#x}: addresses are 0..2**64-1")


def _check_access(port: int, size: int) -> None:
    if size not in ACCESS_SIZES:
        raise IoBusError(f"port I/O access of {size} bytes at {port:#x}: size must be 1, 2 or 4")
    if not 0 <= port < PORT_SPACE:
        raise IoBusError(f"port I/O access at {port:#x}: ports are 0x0000..0xffff")
