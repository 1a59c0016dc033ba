"""virtio-net on a tap (virtio 1.x, section 5.1).

Features: ``VIRTIO_NET_F_MAC`` and ``VIRTIO_NET_F_STATUS`` (the link is always up), with the
transport's ``VERSION_1``; no mergeable receive buffers, no checksum or segmentation
offloads, no control queue. Queue 0 is receiveq, queue 1 transmitq. Every frame in either
direction follows the 12-byte ``struct virtio_net_hdr`` (the VERSION_1 form, with
``num_buffers``). Configuration space: ``mac[6]``, ``status`` u16.

Transmit: the device skips the header and writes the frame to the tap, one ``writev`` per
frame straight from the guest's buffers. A failed write (the tap is down or gone) counts a
transmit error and completes the chain: the guest is not stopped by the host's network.

Receive, without losing a frame: the device never holds a frame in its own memory. It reads
the tap only when the guest has made a receive chain available, with ``readv`` straight into
that chain's buffers after the header (which it writes zeroed, ``num_buffers`` = 1). The
order of one batch on the I/O thread, as the transport runs it (see
:meth:`~intrahost.vmm.devices.virtio.mmio.VirtioMmioDevice.process`):

1. the transport takes the next chain and :meth:`VirtioNet.handle` reads one frame into it;
2. when the tap is empty (EAGAIN), ``handle`` answers None: the transport puts the chain back
   (it stays the next available one) and ends the batch, publishing the frames read so far
   with one interrupt; the device then watches the tap once (epoll), and its readiness runs
   the queue again;
3. when the ring is empty the transport re-enables the guest's notifications and the batch
   ends; the tap is *not* watched, so frames wait in the tap's own queue (the kernel's, about
   1000 frames) until the guest's kick for the buffers it adds runs the queue again.

A frame longer than the chain holds is dropped and counted (``rx-dropped``); the same chain
takes the next frame. (A tap read returns at most the bytes its buffers hold, truncating the
frame, so each read gets one spare byte of the VMM's after the chain: a frame that reaches
it did not fit.) A read error other than EAGAIN (the
tap was deleted) stops receiving for good, with one log line.

Across a hand-off the tap's fd travels with the queues' eventfds (``host_fds``: ``tap``).
The drain stops the reads at a frame boundary (a frame is read into guest memory and
published in the same batch), frames arriving during the pause wait in the tap, and the new
VMM reads them once it resumes the guest. The counters travel as the device component's
``backend`` part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intrahost.vmm.devices.virtio.iothread import IoThread
from intrahost.vmm.devices.virtio.queue import Chain, QueueError, VirtioStateError
from intrahost.vmm.devices.virtio.tap import Tap
from intrahost.vmm.persist import JsonRecord, bounded, json_object

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE = 0
TX_QUEUE = 1

#: struct virtio_net_hdr with num_buffers (VERSION_1).
NET_HDR_SIZE = 12
#: What the device writes before each received frame: no flags, no GSO, num_buffers = 1.
RX_HEADER = bytes(10) + (1).to_bytes(2, "little")
#: The shortest frame a tap takes (an Ethernet header).
ETH_HLEN = 14
#: How many transmit errors are logged per device (then only counted).
ERROR_LOG_LIMIT = 16

_COUNT = 2**63 - 1


@dataclass
class NetStats:
    """Per-device counters (``query-net``)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NetStatsState(JsonRecord, label="virtio-net counters", error=VirtioStateError):
    """The counters in the saved state (the device component's ``backend`` part), so that
    ``query-net`` counts the guest's whole life across hand-offs."""

    rx_packets: int = bounded(_COUNT, default=0)
    rx_bytes: int = bounded(_COUNT, default=0)
    rx_dropped: int = bounded(_COUNT, default=0)
    tx_packets: int = bounded(_COUNT, default=0)
    tx_bytes: int = bounded(_COUNT, default=0)
    tx_errors: int = bounded(_COUNT, default=0)


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` as 6 bytes; ValueError when it is not a unicast MAC."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC {text!r} is not six colon-separated hex bytes")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC {text!r} is not six colon-separated hex bytes") from None
    if mac[0] & 1:
        raise ValueError(f"MAC {text} is a multicast address (its first byte is odd)")
    if mac == bytes(6):
        raise ValueError("MAC 00:00:00:00:00:00 is not an address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> str:
    """A random locally administered unicast MAC (first byte: bit 1 set, bit 0 clear)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return format_mac(bytes(raw))


class VirtioNet:
    """The virtio-net backend of a :class:`~intrahost.vmm.devices.virtio.mmio.VirtioMmioDevice`
    (see the module docstring). Runs on the device's I/O thread only."""

    device_id = VIRTIO_ID_NET
    queue_count = 2
    features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS

    def __init__(self, tap: Tap, net_id: str, mac: str) -> None:
        self.tap = tap
        self.net_id = net_id
        self.mac = parse_mac(mac)
        self.stats = NetStats()
        #: Set when a tap read failed for good (the interface is gone): receiving stopped.
        self.rx_failed = False
        self._errors_logged = 0
        self._io: IoThread | None = None
        self._run_rx: Callable[[], None] | None = None
        self._watching = False
        #: One byte after the chain's buffers in every read: a tap read returns at most what
        #: the buffers hold, so a frame that reaches this byte did not fit in the chain.
        self._spare = memoryview(bytearray(1))

    def bind(self, io: IoThread, process: Callable[[int], None]) -> None:
        """The transport's I/O thread and its ``process(queue)``: the tap's readiness runs
        the receive queue there."""
        self._io = io
        self._run_rx = lambda: process(RX_QUEUE)

    def config_space(self) -> bytes:
        return self.mac + VIRTIO_NET_S_LINK_UP.to_bytes(2, "little")

    def host_fds(self) -> dict[str, int]:
        return {"tap": self.tap.fd}

    def close(self) -> None:
        self.tap.close()

    # --- state (the transport's BackendState) -------------------------------------------------

    def save_state(self) -> bytes:
        return NetStatsState(**self.stats.to_dict()).to_json()

    def load_state(self, payload: bytes | None, where: str) -> Callable[[], None]:
        if payload is None:
            counters = NetStatsState()
        else:
            counters = NetStatsState.from_dict(
                json_object(where, payload), where=f"component {where!r}"
            )

        def apply() -> None:
            self.stats = NetStats(**counters.to_dict())

        return apply

    # --- chains ----------------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int | None:
        """Transmit one frame (queue 1), or receive one into the chain (queue 0): the bytes
        written into the chain, or None when the tap has no frame for it now (the transport
        then puts the chain back)."""
        if queue == TX_QUEUE:
            self._transmit(chain)
            return 0
        return self._receive(chain)

    def _transmit(self, chain: Chain) -> None:
        if chain.readable_len < NET_HDR_SIZE:
            raise QueueError(
                f"virtio-net transmit chain at head {chain.head} holds {chain.readable_len} "
                f"bytes, less than the {NET_HDR_SIZE}-byte header"
            )
        bufs = chain.readable
        first = bufs[0]
        if len(first) == NET_HDR_SIZE:
            frame = bufs[1:]
        elif len(first) > NET_HDR_SIZE:
            frame = [first[NET_HDR_SIZE:], *bufs[1:]]
        else:
            frame = _skip(bufs, NET_HDR_SIZE)
        length = chain.readable_len - NET_HDR_SIZE
        stats = self.stats
        if length < ETH_HLEN:
            stats.tx_errors += 1
            self._log_error(f"a {length}-byte frame (shorter than an Ethernet header) dropped")
            return
        try:
            os.writev(self.tap.fd, frame)
        except OSError as e:
            stats.tx_errors += 1
            self._log_error(f"writing a {length}-byte frame to tap {self.tap.ifname}: {e}")
            return
        stats.tx_packets += 1
        stats.tx_bytes += length

    def _receive(self, chain: Chain) -> int | None:
        if self.rx_failed:
            return None
        if chain.readable or chain.writable_len < NET_HDR_SIZE:
            raise QueueError(
                f"virtio-net receive chain at head {chain.head} has device-readable buffers or "
                f"less than the {NET_HDR_SIZE}-byte header"
            )
        bufs = chain.writable
        first = bufs[0]
        spare = self._spare
        if len(first) > NET_HDR_SIZE:
            first[:NET_HDR_SIZE] = RX_HEADER
            iov = [first[NET_HDR_SIZE:], *bufs[1:], spare]
        elif len(first) == NET_HDR_SIZE:
            first[:] = RX_HEADER
            iov = [*bufs[1:], spare]
        else:
            iov = [*_skip(bufs, NET_HDR_SIZE), spare]
            _fill(bufs, RX_HEADER)
        room = chain.writable_len - NET_HDR_SIZE
        stats = self.stats
        fd = self.tap.fd
        while True:
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                self._watch()
                return None
            except OSError as e:
                self.rx_failed = True
                log.error(
                    "net %s: reading tap %s failed (%s): receiving stopped",
                    self.net_id,
                    self.tap.ifname,
                    os.strerror(e.errno) if e.errno else e,
                )
                return None
            if n <= room:
                stats.rx_packets += 1
                stats.rx_bytes += n
                return NET_HDR_SIZE + n
            stats.rx_dropped += 1  # it reached the spare byte: the frame did not fit

    def _watch(self) -> None:
        """Have the tap's readiness run the receive queue, once (see the module docstring)."""
        io = self._io
        if io is None or self._watching:
            return
        self._watching = True
        io.watch(self.tap.fd, self._on_readable)

    def _on_readable(self) -> None:
        assert self._io is not None and self._run_rx is not None
        self._io.unwatch(self.tap.fd)
        self._watching = False
        self._run_rx()

    def _log_error(self, text: str) -> None:
        if self._errors_logged < ERROR_LOG_LIMIT:
            self._errors_logged += 1
            log.warning(
                "net %s: %s%s",
                self.net_id,
                text,
                " (further errors are only counted)"
                if self._errors_logged == ERROR_LOG_LIMIT
                else "",
            )

    # --- queries ---------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """This device in ``query-net``'s shape."""
        stats = self.stats
        return {
            "id": self.net_id,
            "ifname": self.tap.ifname,
            "mac": format_mac(self.mac),
            "link": "up",
            "rx-stopped": self.rx_failed,
            "rx-packets": stats.rx_packets,
            "rx-bytes": stats.rx_bytes,
            "rx-dropped": stats.rx_dropped,
            "tx-packets": stats.tx_packets,
            "tx-bytes": stats.tx_bytes,
            "tx-errors": stats.tx_errors,
            "tap-dropped": _tap_dropped(self.tap.ifname),
        }


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes (which they hold)."""
    out: list[memoryview] = []
    for i, b in enumerate(bufs):
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        out.extend(bufs[i + 1 :])
        break
    return out


def _fill(bufs: list[memoryview], data: bytes) -> None:
    at = 0
    for b in bufs:
        if at >= len(data):
            return
        k = min(len(b), len(data) - at)
        b[:k] = data[at : at + k]
        at += k


def _tap_dropped(ifname: str) -> int | None:
    """Frames the kernel dropped because the tap's queue was full (the guest had no buffers
    for that long): the interface's tx_dropped, or None when it cannot be read (another
    network namespace, the interface gone)."""
    try:
        with open(f"/sys/class/net/{ifname}/statistics/tx_dropped") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


__all__ = [
    "ETH_HLEN",
    "NET_HDR_SIZE",
    "RX_QUEUE",
    "TX_QUEUE",
    "VIRTIO_ID_NET",
    "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_STATUS",
    "NetStats",
    "NetStatsState",
    "VirtioNet",
    "format_mac",
    "parse_mac",
    "random_mac",
]
