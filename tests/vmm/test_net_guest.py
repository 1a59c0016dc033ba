"""The net guest: its ABI (net.h against layout.py), its probe, and the guest itself answering
ARP, ping and UDP echo on a tap in a network namespace the test creates.

The guest runs under a VMM that is a parameter: QEMU's microvm with its virtio-net-device
(skipped without QEMU or /dev/kvm), and intrahost's own VMM with ``--net tap=tap0`` (skipped
until intrahost has a virtio-net device, ``intrahost.vmm.devices.virtio.net``). Everything
networked happens in the namespace (192.0.2.0/24 only), removed at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from guestkit import (
    EXIT_DEVICE,
    GUEST_RAM,
    HAVE_KVM,
    MICROVM_DEVICE,
    QEMU,
    Qmp,
    check_status_abi,
    header_defines,
    microvm_command,
)
from guestkit import isolated_guest_cache as isolated_guest_cache  # autouse
from support import PATIENCE, wait_until
from tapkit import inside

from intrahost.vmm.guests import layout
from intrahost.vmm.guests.layout import ExitCode, NetState, NetStatus, ReportTag
from intrahost.vmm.guests.netcheck import NetNamespace
from intrahost.vmm.guests.probe import NetProbe

MiB = 1 << 20
HOST_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
GUEST_ARGS = f"ip={GUEST_IP}/24"
QEMU_MAC = "52:54:00:12:34:56"


# --- ABI -----------------------------------------------------------------------------------------


def test_net_h_matches_layout() -> None:
    h = header_defines("net.h")
    pairs = {
        "UART_DATA": layout.UART_BASE,
        "UART_LSR": layout.UART_LSR,
        "DEBUG_TAG": layout.DEBUG_PORT_TAG,
        "DEBUG_VALUE_LO": layout.DEBUG_PORT_VALUE_LO,
        "DEBUG_VALUE_HI": layout.DEBUG_PORT_VALUE_HI,
        "NET_STATUS_ADDR": layout.NET_STATUS_ADDR,
        "NET_RXQ_ADDR": layout.NET_RXQ_ADDR,
        "NET_TXQ_ADDR": layout.NET_TXQ_ADDR,
        "NET_RX_BUFFERS_ADDR": layout.NET_RX_BUFFERS_ADDR,
        "NET_TX_BUFFERS_ADDR": layout.NET_TX_BUFFERS_ADDR,
        "NET_BUFFER_SIZE": layout.NET_BUFFER_SIZE,
        "NET_HDR_SIZE": layout.NET_HDR_SIZE,
        "STATUS_MAGIC": layout.NET_STATUS_MAGIC_U64,
        "ST_SIZE": layout.NET_STATUS_SIZE,
        "ECHO_PORT": layout.NET_ECHO_PORT,
        "DEFAULT_PREFIX": layout.NET_DEFAULT_PREFIX,
        "DEFAULT_PROGRESS": layout.NET_DEFAULT_PROGRESS,
    }
    assert {name: h[name] for name in pairs} == pairs
    exits, tags = check_status_abi(
        h, layout.NET_STATUS_FIELDS, layout.NET_STATUS_SIZE, NetState, "NET_STATE"
    )
    assert set(exits) == {"BAD_CMDLINE", "NO_DEVICE", "DEVICE_ERROR"}
    assert tags == {"ERROR": ReportTag.ERROR.value}
    # The buffers and queues fit between the status page and the end of 6 MiB.
    assert layout.NET_TXQ_ADDR >= layout.NET_RXQ_ADDR + 0x3000
    assert layout.NET_RX_BUFFERS_ADDR >= layout.NET_TXQ_ADDR + 0x3000
    assert layout.NET_TX_BUFFERS_ADDR >= layout.NET_RX_BUFFERS_ADDR + 256 * layout.NET_BUFFER_SIZE
    assert 6 * MiB >= layout.NET_TX_BUFFERS_ADDR + 256 * layout.NET_BUFFER_SIZE


def net_memory(**values: int) -> bytes:
    """Guest RAM holding a net guest status page with these fields (others zero)."""
    fields = dict.fromkeys(layout.NET_STATUS_FIELDS, 0)
    fields["magic"] = layout.NET_STATUS_MAGIC_U64
    fields.update(values)
    mem = bytearray(layout.NET_STATUS_ADDR + layout.NET_STATUS_SIZE)
    struct.pack_into(f"<{len(fields)}Q", mem, layout.NET_STATUS_ADDR, *fields.values())
    return bytes(mem)


def test_probe_reads_the_status_page(tmp_path: Path) -> None:
    mem = net_memory(
        state=NetState.RUNNING, ip=0xC0000202, prefix=24, mac=0x563412005452, heartbeat=99,
        frames_in=30, frames_out=25, arp_replies=1, icmp_echoes=20, udp_echoes=4, dropped=5,
    )  # fmt: skip
    probe = NetProbe(mem)  # bytes: a probe that tried to write would fail
    status = probe.status()
    assert status is not None
    assert (status.address, status.mac_address) == ("192.0.2.2/24", QEMU_MAC)
    progress = probe.progress()
    assert progress is not None
    assert progress["state"] == "running"
    assert progress["address"] == "192.0.2.2/24"
    assert (progress["frames-in"], progress["icmp-echoes"], progress["dropped"]) == (30, 20, 5)
    assert NetProbe(bytes(len(mem))).status() is None
    assert NetProbe(bytes(len(mem))).progress() is None

    (tmp_path / "memory").write_bytes(mem + bytes(MiB))
    os.chmod(tmp_path / "memory", 0o444)
    with NetProbe.open(tmp_path / "memory") as opened:  # a read-only mapping
        assert opened.status() == status
    assert (tmp_path / "memory").read_bytes()[: len(mem)] == mem


# --- the namespace -------------------------------------------------------------------------------


class Netns(NetNamespace):
    """The product's namespace (tap0 = 192.0.2.1/24, up; ``lo`` up), created at once, with
    what these tests add: a socket made inside it, and tap0's MAC and neighbour entries."""

    def __init__(self) -> None:
        super().__init__("tap0", address=f"{HOST_IP}/24", prefix="intrahost-t-net")
        self.create()

    def delete(self) -> None:
        self.remove()

    def exec(self, *command: str) -> list[str]:
        """``command`` run inside the namespace."""
        return self.command(command)

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket in the namespace (made by a thread that joined it)."""
        return inside(self.name, lambda: socket.socket(family, kind, proto))

    def tap_mac(self) -> str:
        """tap0's MAC, where the guest's answers go."""
        found = re.search(r"link/ether (\S+)", self.ip("link", "show", "tap0"))
        assert found, "tap0 has no MAC"
        return found[1]

    def neighbour(self, ip: str) -> str:
        return self.ip("neigh", "show", ip, "dev", "tap0").strip()


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


# --- the VMMs ------------------------------------------------------------------------------------

HAVE_NET_DEVICE = importlib.util.find_spec("intrahost.vmm.devices.virtio.net") is not None
QEMU_NET_OPTIONS = ",".join(
    f"{option}=off"
    for option in (
        "mrg_rxbuf", "csum", "guest_csum", "gso", "guest_tso4", "guest_tso6", "guest_ecn",
        "guest_ufo", "host_tso4", "host_tso6", "host_ecn", "host_ufo", "ctrl_vq",
    )
)  # fmt: skip


class NetGuest(Protocol):
    """The net guest running under some VMM in a namespace."""

    process: subprocess.Popen[bytes]

    def serial(self) -> str: ...

    def status(self) -> NetStatus | None: ...

    def stop(self) -> None: ...


class QemuNetGuest:
    """Under QEMU's microvm: the status page read with QMP ``pmemsave`` (QEMU reads, the guest
    keeps running). ``exit_device``: end QEMU when the guest writes its exit code."""

    def __init__(
        self,
        ns: Netns,
        tmp: Path,
        args: str,
        exit_device: bool = True,
        entries: str = MICROVM_DEVICE,
    ) -> None:
        self.tmp = tmp
        self.qmp_path = tmp / "qmp.sock"
        command = microvm_command(
            "net", f"{entries} {args}", tmp / "serial.log",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={QEMU_MAC},{QEMU_NET_OPTIONS}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(EXIT_DEVICE if exit_device else ()),
        )  # fmt: skip
        self.process = subprocess.Popen(
            ns.exec(*command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self._qmp: Qmp | None = None

    def serial(self) -> str:
        path = self.tmp / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> NetStatus | None:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)
        dump = self.tmp / "status.bin"
        self._qmp.execute(
            "pmemsave", val=layout.NET_STATUS_ADDR, size=layout.NET_STATUS_SIZE, filename=str(dump)
        )
        # The probe wants guest-physical address A at index A: put the page where it belongs.
        return NetProbe(bytes(layout.NET_STATUS_ADDR) + dump.read_bytes()).status()

    def stop(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(PATIENCE)
        assert self.process.stderr is not None
        self.process.stderr.close()


class IntrahostNetGuest:
    """Under intrahost's VMM with ``--net tap=tap0``; the status page read from its memory file
    with a read-only NetProbe."""

    def __init__(self, ns: Netns, tmp: Path, args: str, exit_device: bool = True) -> None:
        del exit_device  # intrahost's debug port always ends the run on an exit code
        self.tmp = tmp
        self.memory = Path("/dev/shm") / f"{ns.name}-ram"
        command = [
            sys.executable, "-m", "intrahost", "run", "--guest", "net", "--net", "tap=tap0",
            "--guest-args", args, "--memory", str(GUEST_RAM), "--memory-path", str(self.memory),
            "--serial", f"file:{tmp / 'serial.log'}", "--api-socket", str(tmp / "api.sock"),
            "--name", ns.name,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            ns.exec(*command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def serial(self) -> str:
        path = self.tmp / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> NetStatus | None:
        if not self.memory.exists():
            return None
        with NetProbe.open(self.memory) as probe:
            return probe.status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(PATIENCE)
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.memory.unlink(missing_ok=True)


VMMS = [
    pytest.param(
        QemuNetGuest,
        id="qemu",
        marks=pytest.mark.skipif(
            QEMU is None or not HAVE_KVM,
            reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86) and /dev/kvm",
        ),
    ),
    pytest.param(
        IntrahostNetGuest,
        id="intrahost",
        marks=pytest.mark.skipif(
            not HAVE_NET_DEVICE or not HAVE_KVM,
            reason="needs intrahost's virtio-net device (intrahost.vmm.devices.virtio.net) "
            "and /dev/kvm",
        ),
    ),
]


@pytest.fixture(params=VMMS)
def vmm(request: pytest.FixtureRequest) -> type[QemuNetGuest] | type[IntrahostNetGuest]:
    kind: type[QemuNetGuest] | type[IntrahostNetGuest] = request.param
    return kind


@pytest.fixture
def guest(
    vmm: type[QemuNetGuest] | type[IntrahostNetGuest], netns: Netns, tmp_path: Path
) -> Iterator[tuple[NetGuest, Netns]]:
    """The net guest answering on 192.0.2.2, once its banner is out and its loop runs."""
    running = vmm(netns, tmp_path, GUEST_ARGS)
    try:
        wait_until(
            lambda: running.process.poll() is not None or "net: device at" in running.serial(),
            "the net guest's banner",
        )
        assert running.process.poll() is None, running.serial()
        status_when(running, lambda s: s.state == NetState.RUNNING, "the net guest's loop")
        yield running, netns
    finally:
        running.stop()


# --- traffic -------------------------------------------------------------------------------------


def ping(ns: Netns, count: int, interval: float) -> tuple[int, int, list[float]]:
    """(transmitted, received, [min, avg, max, mdev] ms) of ``ping`` from the namespace."""
    result = ns.run(
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "5", GUEST_IP],
        check=False,
        timeout=PATIENCE,
    )
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    assert counts, result.stdout + result.stderr
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", result.stdout)
    return int(counts[1]), int(counts[2]), [float(x) for x in rtt.groups()] if rtt else []


def udp_socket(ns: Netns) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, 0))
    sock.connect((GUEST_IP, layout.NET_ECHO_PORT))
    return sock


def payload(seq: int, size: int) -> bytes:
    head = struct.pack("<Q", seq)
    return (head * (size // 8 + 1))[:size] if size >= 8 else head[:size]


def echo_window(
    sock: socket.socket, count: int, window: int, size: int
) -> tuple[int, int, int, float]:
    """Send ``count`` datagrams of ``size`` bytes with up to ``window`` unanswered; (echoes
    that came back intact, mismatched, lost (no echo within 1 s), seconds)."""
    sock.settimeout(1.0)
    sent = good = bad = lost = 0
    outstanding = 0
    start = time.monotonic()
    while good + bad + lost < count:
        while outstanding < window and sent < count:
            sock.send(payload(sent, max(size, 8)))
            sent += 1
            outstanding += 1
        try:
            data = sock.recv(65536)
        except TimeoutError:
            lost += outstanding
            outstanding = 0
            continue
        outstanding -= 1
        seq = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else -1
        if 0 <= seq < sent and data == payload(seq, max(size, 8)):
            good += 1
        else:
            bad += 1
    return good, bad, lost, time.monotonic() - start


def eth_frame(dst_mac: str, src_mac: str, packet: bytes) -> bytes:
    """An Ethernet frame carrying the IPv4 ``packet``."""
    return bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", "")) + b"\x08\x00" + packet


def ip_udp(src: str, dst: str, sport: int, dport: int, data: bytes, udp_csum: int) -> bytes:
    """An IPv4/UDP packet with a correct IP checksum and the given UDP checksum."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), udp_csum) + data
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
            socket.inet_aton(src), socket.inet_aton(dst),
        )
    )  # fmt: skip
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", header, 10, ~total & 0xFFFF)
    return bytes(header) + udp


def status_when(running: NetGuest, holds: Callable[[NetStatus], bool], what: str) -> NetStatus:
    """The guest's status page, once ``holds`` is true of it."""

    def check() -> NetStatus | None:
        status = running.status()
        return status if status is not None and holds(status) else None

    return wait_until(check, what)


# --- the guest under a VMM -----------------------------------------------------------------------


def test_ping_arp_and_counters(guest: tuple[NetGuest, Netns]) -> None:
    running, ns = guest
    before = running.status()
    assert before is not None
    assert before.address == "192.0.2.2/24"
    assert ns.neighbour(GUEST_IP) == ""  # nothing resolved yet

    sent, received, rtt = ping(ns, 20, 0.01)
    assert (sent, received) == (20, 20), running.serial()
    # ARP resolved the guest's address to the MAC on its status page.
    assert f"lladdr {before.mac_address}" in ns.neighbour(GUEST_IP)
    print(f"ping -c 20 -i 0.01: rtt min/avg/max/mdev = {rtt} ms")

    after = status_when(
        running,
        lambda s: s.frames_out == s.arp_replies + s.icmp_echoes + s.udp_echoes,
        "the guest to count its replies sent",
    )
    assert after.icmp_echoes == 20
    assert after.arp_replies >= 1
    assert after.udp_echoes == 0
    assert after.errors == 0 and after.duplicates == 0
    assert after.frames_in >= after.arp_replies + after.icmp_echoes
    assert after.heartbeat > before.heartbeat
    assert after.tx_kicks >= 1


def test_udp_echo(guest: tuple[NetGuest, Netns]) -> None:
    running, ns = guest
    with udp_socket(ns) as sock:
        sock.settimeout(5.0)
        port = sock.getsockname()[1]
        for size in (0, 1, 100, 1472):
            data = os.urandom(size)
            sock.send(data)
            reply, sender = sock.recvfrom(2048)
            assert (reply, sender) == (data, (GUEST_IP, layout.NET_ECHO_PORT)), size
        # The echo went back to our port: recvfrom on a connected socket saw it there.
        assert sock.getsockname()[1] == port
        # Another port: dropped, not answered.
        with udp_socket(ns) as other:
            other.connect((GUEST_IP, 9))
            other.send(b"discard me")
        sock.send(b"after")
        assert sock.recv(2048) == b"after"
    status = status_when(running, lambda s: s.udp_echoes == 5, "the guest to count 5 UDP echoes")
    assert status.dropped >= 1
    assert status.errors == 0


def test_malformed_frames_are_counted_not_answered(guest: tuple[NetGuest, Netns]) -> None:
    running, ns = guest
    before = running.status()
    assert before is not None
    with udp_socket(ns) as sock:
        sock.settimeout(5.0)
        sock.send(b"resolve")  # ARP first, so that the kernel knows the guest
        assert sock.recv(2048) == b"resolve"
        port = sock.getsockname()[1]
        host_mac = ns.tap_mac()
        raw = ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with raw:
            raw.bind(("tap0", 0))
            good = ip_udp(HOST_IP, GUEST_IP, port, 7, b"bad checksum", 0x1234)
            raw.send(eth_frame(before.mac_address, host_mac, good))  # a wrong UDP checksum
            broken_ip = bytearray(ip_udp(HOST_IP, GUEST_IP, port, 7, b"bad header", 0))
            broken_ip[10] ^= 0xFF
            raw.send(
                eth_frame(before.mac_address, host_mac, bytes(broken_ip))
            )  # a wrong IP checksum
            raw.send(
                eth_frame(
                    before.mac_address, host_mac, ip_udp(HOST_IP, GUEST_IP, port, 7, b"ok", 0)
                )
            )
        assert sock.recv(2048) == b"ok"  # the only answer: the two bad ones were not echoed
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(2048)
    status = status_when(
        running, lambda s: s.errors >= 2, "the guest to count two malformed frames"
    )
    assert (status.errors, status.udp_echoes) == (2, 2)


def test_udp_echo_rate(guest: tuple[NetGuest, Netns], vmm: type[Any]) -> None:
    """Many datagrams with a window in flight all come back intact; prints the rate."""
    running, ns = guest
    count = 20000
    with udp_socket(ns) as sock:
        good, bad, lost, seconds = echo_window(sock, count, window=64, size=64)
    status = running.status()
    assert status is not None
    print(
        f"{vmm.__name__}: {good} UDP echoes of 64 bytes, window 64, in {seconds:.2f} s: "
        f"{good / seconds:.0f}/s; lost {lost}; guest rx_kicks={status.rx_kicks} "
        f"tx_kicks={status.tx_kicks} frames_out={status.frames_out}"
    )
    assert bad == 0
    # A datagram may be lost when the host drops it (a full socket or tap queue), never
    # mangled; nearly all must come back.
    assert good >= count * 0.99, (good, lost)
    assert status.errors == 0 and status.duplicates == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("", "no ip= on the command line"),
        ("ip=192.0.2.300", "bad value .*: ip=192.0.2.300"),
        ("ip=192.0.2.2/33", "bad value .*: ip=192.0.2.2/33"),
        ("ip=224.0.0.1", "bad value .*: ip=224.0.0.1"),
        (f"{GUEST_ARGS} speed=1", "unknown command line key .*: speed=1"),
    ],
    ids=["missing", "octet", "prefix", "multicast", "unknown"],
)
def test_bad_command_line(
    vmm: type[QemuNetGuest] | type[IntrahostNetGuest],
    netns: Netns,
    tmp_path: Path,
    args: str,
    message: str,
) -> None:
    """The guest names the problem on its console and on its status page, and stops."""
    running = vmm(netns, tmp_path, args, exit_device=False)
    try:
        wait_until(
            lambda: re.search(r"net: error: .*\n", running.serial()), "the guest's error line"
        )
        assert re.search(f"net: error: {message}", running.serial()), running.serial()
        status = status_when(
            running, lambda s: s.state == NetState.FAILED, "the FAILED state on the status page"
        )
        assert status.exit_code == ExitCode.BAD_CMDLINE
    finally:
        running.stop()


@pytest.mark.skipif(QEMU is None or not HAVE_KVM, reason="needs qemu-system-x86_64 and /dev/kvm")
def test_qemu_no_device_exit_code(netns: Netns, tmp_path: Path) -> None:
    """With no virtio-net device behind its entries the guest ends the run with NO_DEVICE."""
    running = QemuNetGuest(
        netns, tmp_path, GUEST_ARGS, entries="virtio_mmio.device=4K@0xd0000000:5"
    )
    try:
        code = running.process.wait(PATIENCE)
        assert code & 1 and code >> 1 == ExitCode.NO_DEVICE, running.serial()
        assert running.serial().splitlines() == [
            "net: no virtio-mmio device at 0xd0000000",
            "net: error: no virtio-net device among the virtio_mmio.device= entries",
        ]
    finally:
        running.stop()
