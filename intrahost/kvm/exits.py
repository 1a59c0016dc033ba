"""Decoded vCPU exits: what one KVM_RUN stopped for, as a small typed record.

:meth:`Vcpu.run` returns one record per KVM_RUN; only the fields its exit kind needs are read
from the shared ``kvm_run`` page, with one precompiled ``struct`` unpack (the exit path is hot:
tens of thousands of exits per second per vCPU).

- :class:`PortIn` (KVM_EXIT_IO, in): port, size, count; finished with ``complete(data)``;
- :class:`PortOut` (KVM_EXIT_IO, out): port, size, count, data;
- :class:`MmioRead` (KVM_EXIT_MMIO, a load): address, length; finished with ``complete(data)``;
- :class:`MmioWrite` (KVM_EXIT_MMIO, a store): address, length, data;
- :class:`Halt`, :class:`Shutdown` (KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN): no fields;
- :class:`Interrupted`: KVM_RUN returned EINTR or EAGAIN (a signal, ``immediate_exit``), so
  there is nothing to handle;
- :class:`InternalErrorExit` (KVM_EXIT_INTERNAL_ERROR): suberror, data words;
- :class:`FailEntry` (KVM_EXIT_FAIL_ENTRY): hardware_reason, cpu;
- :class:`SystemEvent` (KVM_EXIT_SYSTEM_EVENT): type, data words;
- :class:`OtherExit`: any other exit, with its raw ``reason`` number.

Ordering rule for reads (:class:`PortIn`, :class:`MmioRead`): the guest's ``in`` or MMIO load
is finished by KVM at the *next* KVM_RUN on the same vCPU, which copies the data userspace
left in ``kvm_run`` into the guest register. So ``complete()`` must be called after this
``run()`` returned and before the vCPU's next ``run()`` (a vCPU being paused enters KVM_RUN
once more with ``immediate_exit`` set, which finishes the instruction without running on).
``complete()`` writes straight into the mapped ``kvm_run``; a record is stale once the vCPU
ran again, and completing it then would corrupt whatever exit came after. A read left
uncompleted hands the guest whatever bytes ``kvm_run`` happened to hold.
"""

from __future__ import annotations

import mmap
import struct
from typing import ClassVar

from intrahost.errors import IntrahostError
from intrahost.kvm.constants import KVM_EXIT_IO_OUT, ExitReason


class ExitCompletionError(IntrahostError):
    """A read exit was completed with data of the wrong length."""


# Offsets in kvm_run (checked against the kernel headers by tests/kvm/test_layout.py through
# the uapi mirror): exit_reason at 8, the exit union at 32.
#   io:   direction u8, size u8, port u16, count u32, data_offset u64
#   mmio: phys_addr u64, data u8[8], len u32, is_write u8
#   internal / system_event: u32, ndata u32, data u64[16]
#   fail_entry: hardware_entry_failure_reason u64, cpu u32
_IO = struct.Struct("<8xI20xBBHIQ")
_MMIO = struct.Struct("<8xI20xQ8sIB")
_WORDS = struct.Struct("<32xII16Q")
_FAIL_ENTRY = struct.Struct("<32xQI")
_MMIO_DATA = 40

_IO_REASON = int(ExitReason.IO)
_MMIO_REASON = int(ExitReason.MMIO)


class VcpuExit:
    """Base of every exit record; ``reason`` is the KVM exit reason it decodes."""

    __slots__ = ()
    #: The field names shown by ``repr``.
    _fields: ClassVar[tuple[str, ...]] = ()
    reason: int

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({args})"


class PortIn(VcpuExit):
    """An ``in``/``ins`` of ``count`` items of ``size`` bytes from ``port``.

    Finish it with :meth:`complete` before the vCPU's next KVM_RUN (see the module docstring).
    """

    __slots__ = ("_at", "_buf", "count", "port", "size")
    _fields = ("port", "size", "count")
    reason = ExitReason.IO
    is_write: ClassVar[bool] = False

    def __init__(self, port: int, size: int, count: int, buf: mmap.mmap, at: int) -> None:
        self.port = port
        self.size = size
        self.count = count
        self._buf = buf
        self._at = at

    def complete(self, data: bytes) -> None:
        """Hand the guest ``size * count`` bytes (little-endian items, in order)."""
        n = self.size * self.count
        if len(data) != n:
            raise ExitCompletionError(
                f"in from port {self.port:#x} wants {n} bytes ({self.count} x {self.size}), "
                f"got {len(data)}"
            )
        self._buf[self._at : self._at + n] = data


class PortOut(VcpuExit):
    """An ``out``/``outs`` of ``count`` items of ``size`` bytes to ``port``; ``data`` holds
    them all (``size * count`` bytes, little-endian items in order)."""

    __slots__ = ("count", "data", "port", "size")
    _fields = ("port", "size", "count", "data")
    reason = ExitReason.IO
    is_write: ClassVar[bool] = True

    def __init__(self, port: int, size: int, count: int, data: bytes) -> None:
        self.port = port
        self.size = size
        self.count = count
        self.data = data


class MmioRead(VcpuExit):
    """A load of ``length`` bytes (1 to 8) from guest-physical ``address`` that no memory
    slot backs. Finish it with :meth:`complete` before the vCPU's next KVM_RUN."""

    __slots__ = ("_buf", "address", "length")
    _fields = ("address", "length")
    reason = ExitReason.MMIO
    is_write: ClassVar[bool] = False

    def __init__(self, address: int, length: int, buf: mmap.mmap) -> None:
        self.address = address
        self.length = length
        self._buf = buf

    def complete(self, data: bytes) -> None:
        """Hand the guest ``length`` bytes (little-endian)."""
        if len(data) != self.length:
            raise ExitCompletionError(
                f"MMIO read at {self.address:#x} wants {self.length} bytes, got {len(data)}"
            )
        self._buf[_MMIO_DATA : _MMIO_DATA + self.length] = data


class MmioWrite(VcpuExit):
    """A store of ``data`` (``length`` bytes, little-endian) to guest-physical ``address``
    that no memory slot backs (or a read-only slot)."""

    __slots__ = ("address", "data", "length")
    _fields = ("address", "length", "data")
    reason = ExitReason.MMIO
    is_write: ClassVar[bool] = True

    def __init__(self, address: int, length: int, data: bytes) -> None:
        self.address = address
        self.length = length
        self.data = data


class Halt(VcpuExit):
    """The guest executed ``hlt`` (only seen without an in-kernel LAPIC)."""

    __slots__ = ()
    reason = ExitReason.HLT


class Interrupted(VcpuExit):
    """No exit to handle: a signal or ``immediate_exit`` interrupted KVM_RUN (EINTR), or a
    vCPU waiting for INIT/SIPI got an event and asks to be entered again (EAGAIN)."""

    __slots__ = ()
    reason = ExitReason.INTR


class Shutdown(VcpuExit):
    """The guest shut down, typically a triple fault."""

    __slots__ = ()
    reason = ExitReason.SHUTDOWN


class InternalErrorExit(VcpuExit):
    """KVM could not handle something (e.g. emulation failed); ``suberror`` is a
    KVM_INTERNAL_ERROR_* value and ``data`` its ``ndata`` words."""

    __slots__ = ("data", "suberror")
    _fields = ("suberror", "data")
    reason = ExitReason.INTERNAL_ERROR

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror = suberror
        self.data = data


class FailEntry(VcpuExit):
    """VM entry failed; ``hardware_reason`` is the VMX/SVM exit reason, ``cpu`` the host CPU."""

    __slots__ = ("cpu", "hardware_reason")
    _fields = ("hardware_reason", "cpu")
    reason = ExitReason.FAIL_ENTRY

    def __init__(self, hardware_reason: int, cpu: int) -> None:
        self.hardware_reason = hardware_reason
        self.cpu = cpu


class SystemEvent(VcpuExit):
    """A KVM_SYSTEM_EVENT_* ``type`` (shutdown, reset, crash, ...) with its ``data`` words."""

    __slots__ = ("data", "type")
    _fields = ("type", "data")
    reason = ExitReason.SYSTEM_EVENT

    def __init__(self, type: int, data: tuple[int, ...]) -> None:
        self.type = type
        self.data = data


class OtherExit(VcpuExit):
    """An exit this module has no record for; ``reason`` is the raw KVM_EXIT_* number."""

    __slots__ = ("reason",)
    _fields = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason

    @property
    def name(self) -> str:
        """The reason's KVM_EXIT_* name, or its number."""
        try:
            return ExitReason(self.reason).name
        except ValueError:
            return str(self.reason)


#: The field-less records are shared: decoding them allocates nothing.
HALT = Halt()
INTERRUPTED = Interrupted()
SHUTDOWN = Shutdown()


def _words(buf: mmap.mmap) -> tuple[int, int, tuple[int, ...]]:
    """(first u32, ndata, the first ndata words) of kvm_run.internal / .system_event."""
    first, ndata, *words = _WORDS.unpack_from(buf)
    return first, ndata, tuple(words[: min(ndata, len(words))])


def decode(buf: mmap.mmap) -> VcpuExit:
    """The record for the exit ``buf`` (a vCPU's mapped ``kvm_run``) describes.

    Call it right after a successful KVM_RUN, before anything enters KVM_RUN again.
    """
    reason, direction, size, port, count, at = _IO.unpack_from(buf)
    if reason == _IO_REASON:
        if direction == KVM_EXIT_IO_OUT:
            return PortOut(port, size, count, buf[at : at + size * count])
        return PortIn(port, size, count, buf, at)
    if reason == _MMIO_REASON:
        _, address, data, length, is_write = _MMIO.unpack_from(buf)
        if is_write:
            return MmioWrite(address, length, data[:length])
        return MmioRead(address, length, buf)
    if reason == ExitReason.HLT:
        return HALT
    if reason == ExitReason.SHUTDOWN:
        return SHUTDOWN
    if reason == ExitReason.INTERNAL_ERROR:
        suberror, _, words = _words(buf)
        return InternalErrorExit(suberror, words)
    if reason == ExitReason.FAIL_ENTRY:
        return FailEntry(*_FAIL_ENTRY.unpack_from(buf))
    if reason == ExitReason.SYSTEM_EVENT:
        kind, _, words = _words(buf)
        return SystemEvent(kind, words)
    if reason == ExitReason.INTR:
        return INTERRUPTED
    return OtherExit(reason)
