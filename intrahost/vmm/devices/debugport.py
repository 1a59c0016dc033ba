"""The debug port the built-in test guests report through (I/O base 0x500).

Protocol, all ``out`` instructions:

=========  ==========  ==========================================================
port       size        meaning
=========  ==========  ==========================================================
0x500      4 (eax)     latch a 32-bit report tag
0x504      4 (eax)     latch the low 32 bits of the value
0x508      4 (eax)     the high 32 bits; commits the report (tag, value)
0x50c      1 (al)      end the run with this exit code
=========  ==========  ==========================================================

Tag layout: bits 0..15 are the kind (:class:`ReportKind`), bits 16..23 the vCPU index.
Reads of the debug port return 0.

Latches are kept per vCPU when the VMM tells the port which vCPU is calling
(``current_vcpu``, a function the vCPU thread can answer, e.g. from a thread-local). Without
it every vCPU shares one latch, and guests with several vCPUs must not interleave report
sequences.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intrahost.vmm.persist import JsonRecord, RecordState, StateFormatError, bounded, converted

log = logging.getLogger(__name__)

DEBUG_PORT_BASE = 0x500
DEBUG_PORT_LENGTH = 0x10

#: Offsets from the base.
TAG_OFFSET = 0x0
VALUE_LOW_OFFSET = 0x4
VALUE_HIGH_OFFSET = 0x8
EXIT_OFFSET = 0xC

#: How many reports :attr:`DebugPort.reports` keeps (newest ones).
DEFAULT_REPORT_LIMIT = 4096

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_MAX_VCPUS = 256  # the vCPU field of a tag is 8 bits

STATE_VERSION = 1


class ReportKind(enum.IntEnum):
    """The low 16 bits of a report tag. The guest sources use the same numbers."""

    COUNTER = 1
    MAX_GAP = 2
    CHECKSUM = 3
    HELLO = 4


def make_tag(kind: int, vcpu: int) -> int:
    """The tag a guest on vCPU ``vcpu`` writes to report ``kind``."""
    if not 0 <= kind <= 0xFFFF:
        raise ValueError(f"report kind {kind} does not fit in 16 bits")
    if not 0 <= vcpu < _MAX_VCPUS:
        raise ValueError(f"vCPU index {vcpu} does not fit in 8 bits")
    return (vcpu << 16) | kind


#: ``DebugPortState.to_json()``'s form (keys sorted, compact), for
#: :meth:`DebugPort.state_json`.
_STATE_JSON = (
    '{"exit_code":%s,"latches":[%s],"latest":[%s],"next_seq":%d,"reports":[%s],"version":'
    + str(STATE_VERSION)
    + "}"
)


class DebugPortStateError(StateFormatError):
    """A debug port state record is malformed or cannot be applied."""


@dataclass(frozen=True)
class Report:
    """One committed report. ``seq`` counts reports from 0 over the guest's whole life."""

    seq: int
    tag: int
    value: int

    @property
    def kind(self) -> ReportKind | int:
        """The report kind; a plain int when the guest used a number this host doesn't know."""
        raw = self.tag & 0xFFFF
        try:
            return ReportKind(raw)
        except ValueError:
            return raw

    @property
    def vcpu(self) -> int:
        """The vCPU index from bits 16..23 of the tag."""
        return (self.tag >> 16) & 0xFF


@dataclass(frozen=True)
class LatchState:
    """What one vCPU has latched so far in a report sequence."""

    vcpu: int
    tag: int
    value_low: int


def _latches_from_json(value: Any) -> tuple[LatchState, ...]:
    return tuple(
        LatchState(
            _uint(item, 0, "latches[].vcpu", _MAX_VCPUS - 1),
            _uint(item, 1, "latches[].tag", _U32),
            _uint(item, 2, "latches[].value_low", _U32),
        )
        for item in _triples(value, "latches")
    )


def _latches_to_json(latches: tuple[LatchState, ...]) -> list[list[int]]:
    return [[latch.vcpu, latch.tag, latch.value_low] for latch in latches]


def _reports_to_json(reports: tuple[Report, ...]) -> list[list[int]]:
    return [[r.seq, r.tag, r.value] for r in reports]


@dataclass(frozen=True)
class DebugPortState(
    JsonRecord, label="debug port state", error=DebugPortStateError, version=STATE_VERSION
):
    """Everything the debug port holds; restoring it continues the run exactly.

    ``reports`` is the bounded history (oldest first); ``latest`` holds the newest report of
    every tag ever seen (sorted by tag), including tags whose reports left the history. In
    JSON (:meth:`to_dict`) latches and reports are lists of three integers.
    """

    latches: tuple[LatchState, ...] = converted(_latches_to_json, _latches_from_json)
    reports: tuple[Report, ...] = converted(
        _reports_to_json, lambda value: _reports(value, "reports")
    )
    latest: tuple[Report, ...] = converted(
        _reports_to_json, lambda value: _reports(value, "latest")
    )
    next_seq: int = bounded(_U64)
    exit_code: int | None = bounded(0xFF)

    def check(self) -> None:
        if len({latch.vcpu for latch in self.latches}) != len(self.latches):
            raise DebugPortStateError("debug port state: two latches for the same vCPU")
        for what, reports in (("reports", self.reports), ("latest", self.latest)):
            for report in reports:
                if report.seq >= self.next_seq:
                    raise DebugPortStateError(
                        f"debug port state: {what} has report seq {report.seq} >= next_seq "
                        f"{self.next_seq}"
                    )
        if len({r.tag for r in self.latest}) != len(self.latest):
            raise DebugPortStateError("debug port state: 'latest' has a tag twice")


class DebugPort:
    """The test guests' report and exit port. Thread-safe; see the module docstring."""

    def __init__(
        self,
        *,
        base: int = DEBUG_PORT_BASE,
        report_limit: int = DEFAULT_REPORT_LIMIT,
        current_vcpu: Callable[[], int] | None = None,
    ) -> None:
        if report_limit <= 0:
            raise ValueError("report_limit must be positive")
        self.base = base
        #: Called (outside the device lock, on the vCPU thread that wrote the exit port) with
        #: the exit code, once. The VMM sets it to stop the guest; it must not wait for the
        #: calling vCPU thread itself to stop.
        self.on_exit: Callable[[int], None] | None = None
        self._current_vcpu = current_vcpu
        self._lock = threading.Lock()
        self._latches: dict[int, LatchState] = {}
        self._reports: deque[Report] = deque(maxlen=report_limit)
        self._latest: dict[int, Report] = {}
        self._next_seq = 0
        self._exit_code: int | None = None

    @property
    def length(self) -> int:
        """How many ports the device occupies on the bus."""
        return DEBUG_PORT_LENGTH

    # -- guest side ----------------------------------------------------------------------

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        vcpu = self._current_vcpu() if self._current_vcpu is not None else 0
        exit_code: int | None = None
        with self._lock:
            latch = self._latches.get(vcpu, LatchState(vcpu, 0, 0))
            if offset == TAG_OFFSET:
                self._latches[vcpu] = LatchState(vcpu, value & _U32, latch.value_low)
            elif offset == VALUE_LOW_OFFSET:
                self._latches[vcpu] = LatchState(vcpu, latch.tag, value & _U32)
            elif offset == VALUE_HIGH_OFFSET:
                report = Report(self._next_seq, latch.tag, ((value & _U32) << 32) | latch.value_low)
                self._next_seq += 1
                self._reports.append(report)
                self._latest[report.tag] = report
                self._latches[vcpu] = latch
            elif offset == EXIT_OFFSET:
                if self._exit_code is None:
                    self._exit_code = exit_code = value & 0xFF
                else:
                    log.debug("debug port: exit %d after exit %d ignored", value, self._exit_code)
            else:
                log.debug("debug port: write to %#x (offset %#x) ignored", port, offset)
        if exit_code is not None:
            log.info("guest reported exit code %d on the debug port", exit_code)
            if self.on_exit is not None:
                self.on_exit(exit_code)

    # -- host side -----------------------------------------------------------------------

    @property
    def reports(self) -> tuple[Report, ...]:
        """The newest reports (up to ``report_limit``), oldest first."""
        with self._lock:
            return tuple(self._reports)

    @property
    def report_count(self) -> int:
        """How many reports the guest has committed in total."""
        with self._lock:
            return self._next_seq

    def latest(self, tag: int) -> Report | None:
        """The newest report with exactly this tag (see :func:`make_tag`), if any."""
        with self._lock:
            return self._latest.get(tag)

    @property
    def exit_code(self) -> int | None:
        """The code the guest ended the run with, or None while it runs."""
        with self._lock:
            return self._exit_code

    def persist(self) -> RecordState[DebugPortState]:
        """This device's state component (see ``intrahost.vmm.persist``)."""
        return RecordState(DebugPortState, self.save, self.restore, save_json=self.state_json)

    def save(self) -> DebugPortState:
        """Snapshot the device. Take it with the vCPUs stopped for a consistent result."""
        with self._lock:
            return DebugPortState(
                latches=tuple(self._latches[v] for v in sorted(self._latches)),
                reports=tuple(self._reports),
                latest=tuple(self._latest[t] for t in sorted(self._latest)),
                next_seq=self._next_seq,
                exit_code=self._exit_code,
            )

    def state_json(self) -> bytes:
        """``self.save().to_json()``, byte for byte, formatted directly (it is saved in a
        hand-off's pause)."""
        with self._lock:
            latches = ",".join(
                f"[{latch.vcpu},{latch.tag},{latch.value_low}]"
                for latch in (self._latches[v] for v in sorted(self._latches))
            )
            reports = ",".join(f"[{r.seq},{r.tag},{r.value}]" for r in self._reports)
            latest = ",".join(
                f"[{r.seq},{r.tag},{r.value}]"
                for r in (self._latest[t] for t in sorted(self._latest))
            )
            code = "null" if self._exit_code is None else str(self._exit_code)
            return (_STATE_JSON % (code, latches, latest, self._next_seq, reports)).encode()

    def restore(self, state: DebugPortState) -> None:
        """Replace the device's state with ``state``. ``on_exit`` is not called again."""
        with self._lock:
            self._latches = {latch.vcpu: latch for latch in state.latches}
            self._reports.clear()
            self._reports.extend(state.reports)
            self._latest = {r.tag: r for r in state.latest}
            self._next_seq = state.next_seq
            self._exit_code = state.exit_code


# -- validation helpers ------------------------------------------------------------------


def _check_uint(value: Any, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise DebugPortStateError(
            f"debug port state: {what} must be an integer in 0..{maximum:#x}, got {value!r}"
        )
    return value


def _triples(value: Any, what: str) -> list[list[Any]]:
    if not isinstance(value, list | tuple):
        raise DebugPortStateError(f"debug port state: {what} must be a list")
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise DebugPortStateError(
                f"debug port state: each entry of {what} must be a list of 3 integers"
            )
    return [list(item) for item in value]


def _uint(item: list[Any], index: int, what: str, maximum: int) -> int:
    return _check_uint(item[index], what, maximum)


def _reports(value: Any, what: str) -> tuple[Report, ...]:
    return tuple(
        Report(
            _uint(item, 0, f"{what}[].seq", _U64),
            _uint(item, 1, f"{what}[].tag", _U32),
            _uint(item, 2, f"{what}[].value", _U64),
        )
        for item in _triples(value, what)
    )
