"""Split virtqueues (virtio 1.x, section 2.7), from the device's side.

A queue is three areas of guest memory the driver chose: the descriptor table (16 bytes per
descriptor: addr u64, len u32, flags u16, next u16), the available ring the driver writes
(flags u16, idx u16, ring[size] u16, used_event u16) and the used ring the device writes
(flags u16, idx u16, ring[size] of (id u32, len u32), avail_event u16). Indexes are free-running
16-bit counters: entry ``i`` of a ring lives at ``i % size``, and ``idx`` wraps from 65535 to 0.

The guest is not trusted. Every area and every buffer is reached through
:meth:`GuestMemory.view`, which refuses anything that is not wholly guest RAM, and every
malformed structure (a head or ``next`` index out of the table, a chain longer than the table
allows — which is how a loop shows —, an indirect table that is empty, misaligned, nested,
or not negotiated, a device-readable buffer after a device-writable one, an available index
that moved by more than the queue size) raises :class:`QueueError`. The device then marks
itself broken (DEVICE_NEEDS_RESET) and touches the queue no more until the driver resets it.

Ordering rules, applied where the rings are read and written (x86 keeps stores in order and
loads in order, so only store→load needs a fence):

- the device reads ``avail.idx`` before the ring entries it covers (:meth:`SplitQueue.pop`);
- the device writes used elements before publishing them with ``used.idx``
  (:meth:`SplitQueue.push_used`);
- every 16-bit word the driver may read while the device writes it (``used.idx``,
  ``used.flags``, ``avail_event``) is written with one store, through a view cast to u16:
  ``struct.pack_into`` zeroes its target before it packs, so a driver polling the ring on
  another CPU could see the index drop to 0 and take stale entries for completions;
- after publishing ``used.idx`` the device reads ``used_event`` / ``avail.flags`` to decide
  whether to interrupt, and after re-enabling notifications (``avail_event`` or
  ``used.flags``) it reads ``avail.idx`` again: both are a store followed by a load of
  another location, so :func:`full_fence` separates them (the driver does the mirror image),
  or a buffer made available just then would be neither seen nor notified.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from intrahost.errors import IntrahostError
from intrahost.vmm.memory import GuestAccessError
from intrahost.vmm.persist import JsonRecord, StateFormatError, bounded

#: The largest queue a device offers (QueueNumMax).
MAX_QUEUE_SIZE = 256

#: The most descriptors an indirect table may hold (a chain through it is bounded by this).
MAX_INDIRECT = 1024

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_MAX_LEN = 0xFFFF_FFFF

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: taking a lock is an atomic read-modify-write (a locked
    instruction on x86), which drains this CPU's store buffer before any later load."""
    with _fence_lock:
        pass


class QueueError(IntrahostError):
    """The driver set up a queue, or made a chain available, that breaks the virtio rules."""


class VirtioStateError(StateFormatError):
    """A saved virtio device or queue state is malformed or does not fit this device."""


class GuestRam(Protocol):
    """What a queue needs of guest memory: bounds-checked views (GuestAccessError outside)."""

    def view(self, gpa: int, length: int) -> memoryview: ...


class Chain:
    """One descriptor chain: its head index and its buffers as views of guest memory,
    device-readable ones first, then device-writable ones (zero-length buffers dropped)."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len


@dataclass(frozen=True)
class QueueState(JsonRecord, label="virtqueue state", error=VirtioStateError):
    """A queue's registers and the device's position in its rings.

    ``next_avail`` is the available-ring index the device will process next (entries before
    it are done or in flight); ``next_used`` is the used index it published last."""

    ready: bool
    size: int = bounded(MAX_QUEUE_SIZE)
    desc: int = bounded(2**64 - 1)
    driver: int = bounded(2**64 - 1)
    device: int = bounded(2**64 - 1)
    next_avail: int = bounded(0xFFFF)
    next_used: int = bounded(0xFFFF)


class SplitQueue:
    """One split virtqueue: its registers (set by the driver through the transport) and,
    once activated, views of its three areas. Not thread-safe: the transport serialises
    register access and processing."""

    def __init__(self, index: int, max_size: int = MAX_QUEUE_SIZE) -> None:
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (the areas are dropped)."""
        self.size = self.max_size
        self.ready = False
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self.deactivate()

    def deactivate(self) -> None:
        """Drop the views of guest memory (the mapping can then be closed)."""
        self._memory: GuestRam | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        #: u16 views of used.flags, used.idx and avail_event (one store each).
        self._used_words: memoryview | None = None
        self._avail_event: memoryview | None = None
        self._avail_idx = self.next_avail

    @property
    def active(self) -> bool:
        return self._used is not None

    # --- activation ----------------------------------------------------------------------------

    def activate(self, memory: GuestRam, event_idx: bool, indirect: bool) -> None:
        """Check the driver's setup and map the three areas; QueueError when it is unusable."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(
                f"queue {self.index}: size {size} is not a power of 2 in 1..{self.max_size}"
            )
        if self.desc % 16 or self.driver % 2 or self.device % 4:
            raise QueueError(
                f"queue {self.index}: misaligned areas (descriptors {self.desc:#x} need 16, "
                f"driver {self.driver:#x} 2, device {self.device:#x} 4)"
            )
        try:
            desc = memory.view(self.desc, DESC_SIZE * size)
            avail = memory.view(self.driver, 6 + 2 * size)
            used = memory.view(self.device, 6 + 8 * size)
        except GuestAccessError as e:
            raise QueueError(f"queue {self.index}: {e}") from None
        self._memory, self._desc, self._avail, self._used = memory, desc, avail, used
        self._used_words = used[0:4].cast("H")
        self._avail_event = used[4 + 8 * size : 6 + 8 * size].cast("H")
        self.event_idx = event_idx
        self.indirect = indirect
        self._avail_idx = self.next_avail

    # --- the available ring ----------------------------------------------------------------

    def _read_avail_idx(self) -> int:
        assert self._avail is not None
        idx: int = _U16.unpack_from(self._avail, 2)[0]
        if (idx - self.next_avail) & 0xFFFF > self.size:
            raise QueueError(
                f"queue {self.index}: the available index jumped from {self.next_avail} to "
                f"{idx}, more than the queue size {self.size}"
            )
        return idx

    def has_available(self) -> bool:
        """True when the driver made a chain available that the device has not taken."""
        if self._avail_idx == self.next_avail:
            self._avail_idx = self._read_avail_idx()
        return self._avail_idx != self.next_avail

    def pop(self) -> Chain | None:
        """The next available chain (taking it: ``next_avail`` advances), or None."""
        if not self.has_available():
            return None
        assert self._avail is not None
        head: int = _U16.unpack_from(self._avail, 4 + 2 * (self.next_avail % self.size))[0]
        chain = self._chain(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def put_back(self) -> None:
        """Undo the last :meth:`pop`: its chain is the next available one again."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _chain(self, head: int) -> Chain:
        assert self._desc is not None and self._memory is not None
        view = self._memory.view
        table = self._desc
        limit = self.size
        if head >= limit:
            raise QueueError(f"queue {self.index}: head index {head} >= queue size {limit}")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        writing = False
        in_indirect = False
        index = head
        count = 0
        while True:
            count += 1
            if count > limit:
                raise QueueError(
                    f"queue {self.index}: chain at head {head} is longer than its table of "
                    f"{limit} descriptors (a loop?)"
                )
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, limit = self._indirect(head, count, in_indirect, addr, length, flags)
                in_indirect = True
                index = count = 0
                continue
            try:
                if flags & VIRTQ_DESC_F_WRITE:
                    writing = True
                    if length:
                        writable.append(view(addr, length))
                        wlen += length
                elif writing:
                    raise QueueError(
                        f"queue {self.index}: chain at head {head} has a device-readable "
                        "buffer after a device-writable one"
                    )
                elif length:
                    readable.append(view(addr, length))
                    rlen += length
            except GuestAccessError as e:
                raise QueueError(f"queue {self.index}: chain at head {head}: {e}") from None
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise QueueError(
                    f"queue {self.index}: chain at head {head}: next index {nxt} >= {limit}"
                )
            index = nxt
        if wlen > _MAX_LEN or rlen > _MAX_LEN:
            raise QueueError(f"queue {self.index}: chain at head {head} exceeds 4 GiB")
        return Chain(head, readable, writable, rlen, wlen)

    def _indirect(
        self, head: int, count: int, nested: bool, addr: int, length: int, flags: int
    ) -> tuple[memoryview, int]:
        """The table an indirect descriptor points to, and its length in descriptors."""
        where = f"queue {self.index}: chain at head {head}"
        if not self.indirect:
            raise QueueError(f"{where}: indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
        if nested or count != 1:
            raise QueueError(f"{where}: an indirect descriptor must be the chain's only one")
        if flags & VIRTQ_DESC_F_NEXT:
            raise QueueError(f"{where}: an indirect descriptor must not have NEXT set")
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
            raise QueueError(
                f"{where}: indirect table of {length} bytes (need a multiple of {DESC_SIZE}, "
                f"at most {MAX_INDIRECT} descriptors)"
            )
        if addr % DESC_SIZE:
            raise QueueError(f"{where}: indirect table at {addr:#x} is not 16-byte aligned")
        assert self._memory is not None
        try:
            return self._memory.view(addr, length), length // DESC_SIZE
        except GuestAccessError as e:
            raise QueueError(f"{where}: indirect table: {e}") from None

    # --- the used ring ---------------------------------------------------------------------------

    def push_used(self, completions: list[tuple[int, int]]) -> bool:
        """Publish ``(head, bytes written)`` for each completed chain, then ``used.idx`` once.
        Returns True when the driver wants an interrupt for them."""
        used = self._used
        assert used is not None and self._avail is not None
        size = self.size
        old = u = self.next_used
        for head, written in completions:
            _USED_ELEM.pack_into(used, 4 + 8 * (u % size), head, written)
            u = (u + 1) & 0xFFFF
        assert self._used_words is not None
        self._used_words[1] = u
        self.next_used = u
        full_fence()
        if self.event_idx:
            used_event: int = _U16.unpack_from(self._avail, 4 + 2 * size)[0]
            return (u - used_event - 1) & 0xFFFF < (u - old) & 0xFFFF
        return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # --- notification suppression ----------------------------------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to notify while the device works through the ring. With
        EVENT_IDX nothing is written: ``avail_event`` stays behind ``avail.idx``."""
        if not self.event_idx:
            assert self._used_words is not None
            self._used_words[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for a notification for the next chain; True when one is available already
        (the caller must then process it: its notification may have been suppressed)."""
        assert self._used_words is not None and self._avail_event is not None
        if self.event_idx:
            self._avail_event[0] = self.next_avail
        else:
            self._used_words[0] = 0
        full_fence()
        self._avail_idx = self._read_avail_idx()
        return self._avail_idx != self.next_avail

    # --- state -----------------------------------------------------------------------------------

    def save(self) -> QueueState:
        return QueueState(
            size=self.size,
            ready=self.ready,
            desc=self.desc,
            driver=self.driver,
            device=self.device,
            next_avail=self.next_avail,
            next_used=self.next_used,
        )

    def restore(self, state: QueueState) -> None:
        """Take ``state``'s registers and ring positions (the transport activates)."""
        self.reset()
        self.size = state.size
        self.ready = state.ready
        self.desc, self.driver, self.device = state.desc, state.driver, state.device
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self._avail_idx = self.next_avail
