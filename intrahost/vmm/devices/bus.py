"""The port-I/O bus: which device answers which x86 I/O port.

The vCPU run loop calls :meth:`IoBus.read` and :meth:`IoBus.write` for every ``KVM_EXIT_IO``,
from several vCPU threads at once. The bus takes no lock on that path: its range table is an
immutable tuple that :meth:`IoBus.register` replaces as a whole, so a reader always sees either
the old table or the new one. Devices guard their own state with their own lock.

Devices receive the absolute port number (not an offset), so one device class can sit at
several bases (COM1 at 0x3F8, COM2 at 0x2F8) by being told its base.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from intrahost.errors import IntrahostError

log = logging.getLogger(__name__)

#: The x86 I/O space: ports 0x0000..0xFFFF.
PORT_SPACE = 0x10000

#: Access sizes an ``in``/``out`` instruction can have.
ACCESS_SIZES = (1, 2, 4)

#: How many distinct unclaimed ports are logged at WARNING before the rest go to DEBUG.
UNCLAIMED_WARN_LIMIT = 32


class IoBusError(IntrahostError):
    """A device could not be placed on the I/O bus, or an access was malformed."""


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
            current = self._table[1]
            for existing in current:
                if new.base < existing.end and existing.base < new.end:
                    raise IoBusError(
                        f"cannot register {new}: it overlaps {existing}; choose another base"
                    )
            ranges = tuple(sorted((*current, new), key=lambda r: r.base))
            self._table = (tuple(r.base for r in ranges), ranges)

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
        bases, ranges = self._table
        i = bisect.bisect_right(bases, port) - 1
        if i >= 0:
            candidate = ranges[i]
            if port < candidate.end:
                return candidate
        return None

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


def _check_access(port: int, size: int) -> None:
    if size not in ACCESS_SIZES:
        raise IoBusError(f"port I/O access of {size} bytes at {port:#x}: size must be 1, 2 or 4")
    if not 0 <= port < PORT_SPACE:
        raise IoBusError(f"port I/O access at {port:#x}: ports are 0x0000..0xffff")
