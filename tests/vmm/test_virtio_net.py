"""virtio-net on a real tap, inside a network namespace each test creates: frames both ways
through the test driver, the receive ring running empty (frames wait in the tap), frames too
big for the guest's buffers, a tap deleted under the device, malformed chains, the counters'
state across a device swap, and the frames/s the device serves."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from support import PATIENCE, wait_until
from tapkit import GUEST_IP, GUEST_MAC, NetNs, mac_bytes, udp_frame, udp_payload
from tapkit import tap_netns as tap_netns  # the netns fixture
from virtio_driver import Buf, Driver, start_queues

from intrahost.vmm.devices.virtio.mmio import (
    DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    Reg,
    VirtioMmioDevice,
)
from intrahost.vmm.devices.virtio.net import (
    NET_HDR_SIZE,
    RX_HEADER,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VirtioNet,
)
from intrahost.vmm.devices.virtio.tap import Tap
from intrahost.vmm.memory import GuestMemory, MiB
from intrahost.vmm.persist import Parts

BASE = 0xD000_0000
RX_RING = 0x10000
TX_RING = 0x20000
RX_BUFS = 0x100000  # 256 buffers of 2 KiB
TX_BUFS = 0x200000
BUF = 2048


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.create(16 * MiB) as m:
        yield m


class Nic:
    """A virtio-net device on a tap with a started two-queue driver."""

    def __init__(
        self,
        mem: GuestMemory,
        tap: Tap,
        features: int | None = None,
        dev: VirtioMmioDevice | None = None,
    ) -> None:
        self.mem = mem
        net = VirtioNet(tap, "net0", GUEST_MAC) if dev is None else dev.backend
        assert isinstance(net, VirtioNet)
        self.net: VirtioNet = net
        self.dev = dev or VirtioMmioDevice(self.net, mem, BASE, 5, "virtio-net-test")
        self.rx = Driver(self.dev, mem, ring=RX_RING, queue=0)
        self.tx = Driver(self.dev, mem, ring=TX_RING, queue=1)
        self.rx_heads: dict[int, int] = {}
        self.tx_count = 0
        self.closed = False
        if dev is None:
            start_queues([self.rx, self.tx], features)
            self.dev.start()

    def post_rx(self, count: int, size: int = BUF, split: bool = False) -> None:
        """Make ``count`` receive chains available (each one buffer of ``size`` bytes, or
        with ``split`` a 12-byte header buffer and the rest) and kick."""
        for _ in range(count):
            slot = self.rx.next_desc
            addr = RX_BUFS + slot * BUF
            if split:
                bufs = [Buf(addr, NET_HDR_SIZE, write=True)]
                bufs.append(Buf(addr + NET_HDR_SIZE, size - NET_HDR_SIZE, write=True))
            else:
                bufs = [Buf(addr, size, write=True)]
            head = self.rx.add(bufs)
            self.rx_heads[head] = addr
        self.rx.kick()

    def received(self) -> list[bytes]:
        """The chains the device filled since the last call: header + frame each."""
        return [bytes(self.mem.view(self.rx_heads[h], n)) for h, n in self.rx.take_used()]

    def send(self, frame: bytes, split: bool = True) -> None:
        slot = self.tx.next_desc
        addr = TX_BUFS + slot * BUF
        hdr = bytes(NET_HDR_SIZE)
        self.mem.view(addr, NET_HDR_SIZE + len(frame))[:] = hdr + frame
        if split:
            self.tx.add([Buf(addr, NET_HDR_SIZE), Buf(addr + NET_HDR_SIZE, len(frame))])
        else:
            self.tx.add([Buf(addr, NET_HDR_SIZE + len(frame))])
        self.tx_count += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.dev.close()


def frames_in(chains: list[bytes]) -> list[bytes]:
    for c in chains:
        assert c[:NET_HDR_SIZE] == RX_HEADER
    return [c[NET_HDR_SIZE:] for c in chains]


def collect(nic: Nic, want: int, recycle: bool = False) -> list[bytes]:
    """Frames until ``want`` arrived (re-posting the used buffers with ``recycle``)."""
    got: list[bytes] = []
    deadline = time.monotonic() + PATIENCE
    while len(got) < want:
        assert time.monotonic() < deadline, f"{len(got)} of {want} frames arrived"
        new = nic.received()
        if not new:
            time.sleep(0.001)
            continue
        got += frames_in(new)
        if recycle:
            nic.post_rx(len(new))
    return got


def ours(frames: list[bytes], port: int) -> list[bytes]:
    out = []
    for f in frames:
        udp = udp_payload(f)
        if udp is not None and udp[1] == port:
            out.append(udp[2])
    return out


# --- the device's face ---------------------------------------------------------------------


def test_device_id_features_and_config_space(netns: NetNs, mem: GuestMemory) -> None:
    nic = Nic(mem, netns.open_tap())
    try:
        assert nic.rx.read(Reg.DEVICE_ID) == 1
        offered = nic.rx.device_features()
        assert offered & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_F_VERSION_1)
        assert not offered & ((1 << 15) | 1 | 2 | (1 << 17))  # MRG_RXBUF, CSUM, GUEST_CSUM, CTRL_VQ
        config = bytes(nic.dev.mmio_read(BASE + Reg.CONFIG + i, 1) for i in range(8))
        assert config[:6] == mac_bytes(GUEST_MAC)
        assert struct.unpack("<H", config[6:])[0] == 1  # VIRTIO_NET_S_LINK_UP
        assert nic.net.host_fds() == {"tap": nic.net.tap.fd}
        assert set(nic.dev.host_fds()) == {"tap", "irq", "notify/0", "notify/1"}
    finally:
        nic.close()


# --- transmit --------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [True, False])
def test_guest_frames_reach_a_host_socket(netns: NetNs, mem: GuestMemory, split: bool) -> None:
    sock = netns.udp(7000)
    sock.settimeout(PATIENCE)
    nic = Nic(mem, netns.open_tap())
    try:
        tap_mac = netns.tap_mac()
        payloads = [f"hello {i}".encode() * (i + 1) for i in range(20)]
        for i, p in enumerate(payloads):
            nic.send(udp_frame(tap_mac, p, 5000 + i, 7000), split=split)
        nic.tx.kick()
        got = [sock.recvfrom(4096) for _ in payloads]
        assert [g[0] for g in got] == payloads
        assert {g[1][0] for g in got} == {GUEST_IP}
        wait_until(lambda: nic.tx.used_idx() == len(payloads), "the transmit chains completed")
        stats = nic.net.query()
        assert stats["tx-packets"] == len(payloads)
        assert stats["tx-bytes"] == sum(len(udp_frame(tap_mac, p, 0, 0)) for p in payloads)
        assert stats["tx-errors"] == 0
    finally:
        nic.close()
        sock.close()


# --- receive ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_host_frames_arrive_in_rx_buffers_with_the_header(
    netns: NetNs, mem: GuestMemory, split: bool
) -> None:
    sock = netns.udp()
    nic = Nic(mem, netns.open_tap())
    try:
        nic.post_rx(64, split=split)
        payloads = [b"x" * i + b"!" for i in range(30)]
        for p in payloads:
            sock.sendto(p, (GUEST_IP, 9000))
        frames = collect(nic, len(payloads))
        assert ours(frames, 9000) == payloads
        assert all(f[:6] == mac_bytes(GUEST_MAC) for f in frames)
        stats = nic.net.query()
        assert stats["rx-packets"] == len(frames)
        assert stats["rx-bytes"] == sum(len(f) for f in frames)
        assert stats["rx-dropped"] == 0
    finally:
        nic.close()
        sock.close()


def test_frames_wait_in_the_tap_while_the_ring_is_empty(netns: NetNs, mem: GuestMemory) -> None:
    """No buffers: the device reads nothing; 600 frames queue in the tap and all arrive, in
    order, once the guest posts buffers (256 at a time, refilled as they are used)."""
    sock = netns.udp()
    nic = Nic(mem, netns.open_tap())
    try:
        before = netns.tap_tx_packets()
        count = 600
        for i in range(count):
            sock.sendto(struct.pack("<I", i), (GUEST_IP, 9001))
        wait_until(lambda: netns.tap_tx_packets() >= before + count, "the frames queued in the tap")
        assert nic.rx.used_idx() == 0 and nic.net.stats.rx_packets == 0
        nic.post_rx(256)
        frames = collect(nic, count, recycle=True)
        assert [struct.unpack("<I", p)[0] for p in ours(frames, 9001)] == list(range(count))
        assert nic.net.stats.rx_dropped == 0
        assert nic.net.query()["tap-dropped"] in (0, None)
    finally:
        nic.close()
        sock.close()


def test_the_event_idx_driver_also_gets_every_frame(netns: NetNs, mem: GuestMemory) -> None:
    sock = netns.udp()
    nic = Nic(mem, netns.open_tap())
    try:
        assert nic.rx.read(Reg.DRIVER_FEATURES) is not None
        assert nic.dev.driver_features & VIRTIO_RING_F_EVENT_IDX
        nic.rx.set_used_event(0xFFFF)
        for round_ in range(3):
            for i in range(100):
                sock.sendto(struct.pack("<II", round_, i), (GUEST_IP, 9002))
            nic.post_rx(100)
            frames = collect(nic, 100)
            assert [struct.unpack("<II", p) for p in ours(frames, 9002)] == [
                (round_, i) for i in range(100)
            ]
    finally:
        nic.close()
        sock.close()


def test_a_frame_too_big_for_the_chain_is_dropped_and_counted(
    netns: NetNs, mem: GuestMemory
) -> None:
    sock = netns.udp()
    nic = Nic(mem, netns.open_tap())
    try:
        nic.post_rx(1, size=NET_HDR_SIZE + 200)
        sock.sendto(b"B" * 1000, (GUEST_IP, 9003))
        wait_until(lambda: nic.net.stats.rx_dropped == 1, "the big frame dropped")
        sock.sendto(b"small", (GUEST_IP, 9003))
        frames = collect(nic, 1)
        assert ours(frames, 9003) == [b"small"]
        assert nic.net.stats.rx_packets == 1
        assert not nic.dev.broken
    finally:
        nic.close()
        sock.close()


# --- the tap going away, malformed chains ---------------------------------------------------


def test_a_deleted_tap_counts_tx_errors_and_stops_rx(
    netns: NetNs, mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    sock = netns.udp()
    nic = Nic(mem, netns.open_tap())
    try:
        tap_mac = netns.tap_mac()
        nic.post_rx(8)
        sock.sendto(b"before", (GUEST_IP, 9004))
        assert ours(collect(nic, 1), 9004) == [b"before"]
        netns.exec("ip", "link", "del", "tap0")
        for _ in range(3):
            nic.send(udp_frame(tap_mac, b"lost", 1, 2))
        nic.tx.kick()
        wait_until(lambda: nic.net.stats.tx_errors == 3, "three transmit errors")
        nic.post_rx(1)
        wait_until(lambda: nic.net.rx_failed, "receiving stopped")
        assert not nic.dev.broken
        assert nic.net.query()["rx-stopped"] is True
        assert [r.getMessage() for r in caplog.records if "receiving stopped" in r.getMessage()]
        # The guest carries on: more frames are completed (as errors), nothing breaks.
        nic.send(udp_frame(tap_mac, b"lost", 1, 2))
        nic.tx.kick()
        wait_until(lambda: nic.tx.used_idx() == 4, "the fourth chain completed")
        assert nic.net.stats.tx_errors == 4
    finally:
        nic.close()
        sock.close()


def test_a_transmit_chain_without_its_header_breaks_the_device(
    netns: NetNs, mem: GuestMemory
) -> None:
    nic = Nic(mem, netns.open_tap())
    try:
        nic.tx.add([Buf(TX_BUFS, 4)])
        nic.tx.kick()
        wait_until(lambda: nic.dev.broken, "the device broken")
        assert nic.dev.status & DEVICE_NEEDS_RESET
    finally:
        nic.close()


def test_a_receive_chain_with_a_readable_buffer_breaks_the_device(
    netns: NetNs, mem: GuestMemory
) -> None:
    nic = Nic(mem, netns.open_tap())
    try:
        nic.rx.add([Buf(RX_BUFS, 16), Buf(RX_BUFS + 16, 2000, write=True)])
        nic.rx.kick()
        wait_until(lambda: nic.dev.broken, "the device broken")
    finally:
        nic.close()


def test_a_short_frame_is_a_transmit_error(netns: NetNs, mem: GuestMemory) -> None:
    nic = Nic(mem, netns.open_tap())
    try:
        nic.send(b"\x01\x02\x03")
        nic.tx.kick()
        wait_until(lambda: nic.tx.used_idx() == 1, "the chain completed")
        assert nic.net.stats.tx_errors == 1 and not nic.dev.broken
    finally:
        nic.close()


# --- state across a device swap (the hand-off's device rules, in one process) ---------------


def test_frames_sent_while_drained_arrive_at_the_next_device(
    netns: NetNs, mem: GuestMemory
) -> None:
    """Drain device A (as the pause does), save it; frames sent meanwhile wait in the tap;
    device B, built on duplicates of A's tap and eventfds and the same memory, loads the
    state and receives every one of them after resume; the counters carry over."""
    sock = netns.udp()
    a = Nic(mem, netns.open_tap())
    b_dev: VirtioMmioDevice | None = None
    try:
        a.post_rx(256)
        for i in range(50):
            sock.sendto(struct.pack("<I", i), (GUEST_IP, 9005))
        first = ours(collect(a, 50), 9005)
        assert a.dev.drain()
        before = netns.tap_tx_packets()
        for i in range(50, 120):
            sock.sendto(struct.pack("<I", i), (GUEST_IP, 9005))
        wait_until(lambda: netns.tap_tx_packets() >= before + 70, "the frames queued in the tap")
        assert a.rx.used_idx() == 50  # A, drained, reads nothing
        parts = a.dev.save_parts()
        fds = {k: os.dup(v) for k, v in a.dev.host_fds().items()}
        tap = Tap.from_fd(fds["tap"])
        b_dev = VirtioMmioDevice(
            VirtioNet(tap, "net0", GUEST_MAC),
            mem,
            BASE,
            5,
            "virtio-net-b",
            irq_fd=fds["irq"],
            notify_fds=[fds["notify/0"], fds["notify/1"]],
        )
        b_dev.drain()
        b_dev.start()
        b_dev.load_parts(Parts(_Source(dict(parts)), "d"))()
        a.close()
        b_dev.resume()
        b = Nic(mem, tap, dev=b_dev)
        b.rx.avail_idx, b.rx.used_seen, b.rx.next_desc = a.rx.avail_idx, 50, a.rx.next_desc
        b.rx_heads = a.rx_heads
        rest = ours(collect(b, 70, recycle=True), 9005)
        assert [struct.unpack("<I", p)[0] for p in first + rest] == list(range(120))
        assert b_dev.backend.query()["rx-packets"] == 120  # type: ignore[attr-defined]
    finally:
        if b_dev is not None:
            b_dev.close()
        a.close()  # idempotent
        sock.close()


class _Source:
    def __init__(self, parts: dict[str, bytes]) -> None:
        self.parts = {f"d/{k}" if k else "d": v for k, v in parts.items()}

    def get(self, name: str) -> bytes | None:
        return self.parts.get(name)


# --- speed -------------------------------------------------------------------------------------


def test_frames_per_second_through_the_device(netns: NetNs, mem: GuestMemory) -> None:
    """The device side's rate, measured with the Python driver in this process (which costs
    time too): transmit batches of 256 frames, and receive frames that wait in the tap into
    256 posted buffers at a time. Printed (pytest -s); asserted only to be positive."""
    sock = netns.udp(7001)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    nic = Nic(mem, netns.open_tap())
    try:
        tap_mac = netns.tap_mac()
        frame = udp_frame(tap_mac, b"p" * 64, 7, 7001)
        rounds, batch = 20, 256
        t0 = time.perf_counter()
        for r in range(rounds):
            for _ in range(batch):
                nic.send(frame)
            nic.tx.kick()
            target = (r + 1) * batch
            while nic.tx.used_idx() != target & 0xFFFF:
                select.select([], [], [], 0.0001)
            while select.select([sock], [], [], 0)[0]:
                sock.recv(2048)
        tx_rate = rounds * batch / (time.perf_counter() - t0)
        count = 0
        elapsed = 0.0
        for _ in range(rounds // 2):
            target = netns.tap_tx_packets() + batch
            for _ in range(batch):
                sock.sendto(b"q" * 64, (GUEST_IP, 7))
            wait_until(
                lambda: netns.tap_tx_packets() >= target,  # noqa: B023 (called right here)
                "the frames queued in the tap",
            )
            t1 = time.perf_counter()
            nic.post_rx(batch)
            collect(nic, batch)
            elapsed += time.perf_counter() - t1
            count += batch
        rx_rate = count / elapsed
        print(f"\nvirtio-net device: TX {tx_rate:,.0f} frames/s, RX {rx_rate:,.0f} frames/s")
        assert tx_rate > 0 and rx_rate > 0
    finally:
        nic.close()
        sock.close()
