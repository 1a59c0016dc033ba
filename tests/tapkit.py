"""Network namespaces with a tap for the network device's tests.

:class:`NetNs` is the product's :class:`~intrahost.vmm.guests.netcheck.NetNamespace` (named
``intrahost-t-PID-N``, created at once, deleted by the test) with what the device's tests
add: a persistent tap ``tap0`` with 192.0.2.1/24, IPv6 off (so that the kernel sends nothing
on its own), and a static neighbour entry for the guest's address, so that host datagrams to
the guest need no ARP. The test process reaches into the namespace from a short-lived thread
that ``setns`` into it (only that thread changes namespace): a tap opened or a socket
created there belongs to the namespace and is used from any thread afterwards.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import fcntl
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from support import wait_until

from intrahost.closing import Closeable
from intrahost.vmm.devices.virtio.tap import Tap
from intrahost.vmm.guests.netcheck import NetNamespace

T = TypeVar("T")

CLONE_NEWNET = 0x4000_0000
HOST_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
GUEST_MAC = "02:00:00:00:00:02"
_libc = ctypes.CDLL(None, use_errno=True)


def inside(namespace: str, fn: Callable[[], T]) -> T:
    """``fn()`` run on a short-lived thread that entered the network namespace ``namespace``
    (setns changes only the calling thread's; what ``fn`` makes there stays there)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


class NetNs(NetNamespace):
    """A network namespace with ``tap0``, created by the constructor (see the module
    docstring); :meth:`delete` removes it."""

    def __init__(self, tap: str = "tap0") -> None:
        super().__init__(tap, address=f"{HOST_IP}/24", prefix="intrahost-t")
        self.tap: str = tap
        self.create()
        try:
            # "all" applies to the interfaces that exist (the tap: it has no carrier yet, so
            # it sent nothing) and to "default", for those to come.
            self.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            self.ip("neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", tap)
        except BaseException:
            self.delete()
            raise

    def exec(self, *argv: str) -> str:
        """Run ``argv`` in the namespace; its output."""
        return self.run(argv).stdout

    def delete(self) -> None:
        self.remove()

    def inside(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on a thread that entered this namespace."""
        return inside(self.name, fn)

    def open_tap(self, name: str | None = None) -> Tap:
        """The tap opened in the namespace, once the kernel took its carrier up (see
        :meth:`wait_carrier`)."""
        tap = self.inside(lambda: Tap.open(name or self.tap))
        self.wait_carrier()
        return tap

    def wait_carrier(self) -> None:
        """Wait until the tap's operstate is UP. A tap gets its carrier when an fd attaches;
        the kernel applies it (and activates the queueing discipline) from its link-watch
        work, which it may delay by up to a second: a datagram sent before that is dropped."""
        wait_until(lambda: self.link().get("operstate") == "UP", f"{self.tap}'s carrier")

    def tun_fd(self, name: str | None = None) -> int:
        """A tap fd as another program would pass it: IFF_TAP | IFF_NO_PI, blocking,
        inheritable."""
        fd = self.open_tap(name).fd
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        os.set_inheritable(fd, True)
        return fd

    def udp(self, port: int = 0) -> socket.socket:
        """A UDP socket bound to the host's address in the namespace."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST_IP, port))
            return s

        return self.inside(make)

    def link(self) -> dict[str, object]:
        (info,) = json.loads(self.ip("-s", "-j", "link", "show", self.tap))
        assert isinstance(info, dict)
        return info

    def tap_mac(self) -> bytes:
        return bytes.fromhex(str(self.link()["address"]).replace(":", ""))

    def tap_tx_packets(self) -> int:
        """Frames the host's stack handed to the tap (its queueing discipline's count: the
        tap's own counts a frame only when its reader takes it)."""
        out = json.loads(self.exec("tc", "-s", "-j", "qdisc", "show", "dev", self.tap))
        return sum(int(q.get("packets", 0)) for q in out)


@pytest.fixture(name="netns")
def tap_netns() -> Iterator[NetNs]:
    """The ``netns`` of the network device's tests: a :class:`NetNs`, deleted at teardown. A
    test module takes it with ``from tapkit import tap_netns as tap_netns`` (pytest finds
    fixtures among a module's names), which replaces conftest's ``netns`` there."""
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.delete()


_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_SOL_PACKET = 263
_PACKET_STATISTICS = 6


class FrameClock(Closeable):
    """When the guest's frames reach the host: a packet socket on the namespace's tap, read
    by a thread, records the kernel's time stamp (SO_TIMESTAMPNS, CLOCK_REALTIME ns: when
    the VMM wrote the frame, however late the thread reads it) of every frame from ``mac``.
    :meth:`longest_gap` is then the network blackout of a window (a hand-off), as the
    host's stack saw it. A context manager; compare with ``time.time_ns()``."""

    def __init__(self, ns: NetNs, mac: str = GUEST_MAC) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            s.bind((ns.tap, _ETH_P_ALL))
            return s

        self.mac = mac_bytes(mac)
        self.times = array.array("q")
        self.sock = ns.inside(make)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(16, 64)
            except TimeoutError:
                continue
            if data[6:12] != self.mac:
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    self.times.append(sec * 1_000_000_000 + nsec)

    def dropped(self) -> int:
        """Frames the socket dropped (a full buffer): a gap measured across them is too long."""
        stats = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        return int(struct.unpack("II", stats)[1])

    def longest_gap(self, start_ns: int, end_ns: int) -> float:
        """The longest time (ms) between two consecutive frames from the guest, among the
        frames from the last one before ``start_ns`` to the first one after ``end_ns``."""
        times = self.times
        first = max(bisect.bisect_left(times, start_ns) - 1, 0)
        last = min(bisect.bisect_right(times, end_ns), len(times) - 1)
        gaps = (times[k + 1] - times[k] for k in range(first, last))
        return max(gaps, default=0) / 1e6

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, payload: bytes, sport: int, dport: int) -> bytes:
    """An Ethernet/IPv4/UDP frame from the guest (GUEST_MAC, GUEST_IP) to HOST_IP."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    src = socket.inet_aton(GUEST_IP)
    dst = socket.inet_aton(HOST_IP)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return dst_mac + mac_bytes(GUEST_MAC) + b"\x08\x00" + header + udp


def udp_payload(frame: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of an IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    sport, dport, length, _ = struct.unpack_from("!HHHH", frame, 14 + ihl)
    return sport, dport, frame[14 + ihl + 8 : 14 + ihl + length]
