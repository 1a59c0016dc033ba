"""Network test helpers: the namespace gate, and a UDP echo peer that misbehaves on cue.

The peer stands in for the net guest: run in a test's namespace (``EchoPeer``), it echoes
every datagram back to its sender, except that it can drop, duplicate or delay chosen
sequence numbers of an echo stream, and stall (hold every datagram, then release them all in
order), the way a paused VMM's tap queue does. Given a tap, it is a guest behind it: it
attaches the tap and answers ARP and UDP echo there, and a stall is a real pause of its
reading, with the frames waiting in the tap's own queue. It reports what it did, with
CLOCK_MONOTONIC times. Run as a script, this file is the peer:
``python tests/netsupport.py echo ...``.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from support import PATIENCE, wait_until

from intrahost.vmm.guests.netcheck import ECHO_PORT, MAX_SIZE, NetNamespace, decode

HAVE_NETNS = os.geteuid() == 0 and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(not HAVE_NETNS, reason="needs root and ip (iproute2)")
#: Where the peer listens: on the namespace's lo, so nothing leaves the namespace.
PEER = "192.0.2.2"


class EchoPeer:
    """The misbehaving echo peer as a process in ``netns`` (a context manager). With
    ``tap``, it is a guest behind that tap instead (:func:`serve_tap`)."""

    def __init__(
        self,
        netns: NetNamespace,
        bind: str = PEER,
        port: int = ECHO_PORT,
        *,
        drop: Iterable[int] = (),
        duplicate: Iterable[int] = (),
        delay: dict[int, float] | None = None,
        stall: tuple[int, float] | None = None,
        tap: str | None = None,
    ) -> None:
        self.netns = netns
        self._dir = Path(tempfile.mkdtemp(prefix="ih-peer-"))
        self.ready = self._dir / "ready"
        argv = [sys.executable, __file__, "echo", "--bind", bind, "--port", str(port)]
        if tap is not None:
            argv += ["--tap", tap]
        argv += ["--ready-file", str(self.ready)]
        argv += [a for seq in drop for a in ("--drop", str(seq))]
        argv += [a for seq in duplicate for a in ("--duplicate", str(seq))]
        argv += [a for seq, ms in (delay or {}).items() for a in ("--delay", f"{seq}:{ms}")]
        if stall is not None:
            argv += ["--stall", f"{stall[0]}:{stall[1]}"]
        self.argv = argv
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> EchoPeer:
        self.proc = self.netns.popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        proc = self.proc
        wait_until(lambda: self.ready.exists() or proc.poll() is not None, "the echo peer")
        if proc.poll() is not None:
            raise AssertionError(f"the echo peer failed: {proc.communicate()[1]}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self._dir, ignore_errors=True)

    def stop(self) -> dict[str, Any]:
        """Stop the peer and return what it did."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=PATIENCE)
        assert self.proc.returncode == 0, err
        result: dict[str, Any] = json.loads(out)
        return result


def _seq_ms(text: str) -> tuple[int, float]:
    seq, ms = text.split(":")
    return int(seq), float(ms)


def _on_sigterm() -> list[int]:
    stopping: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    return stopping


def serve(args: argparse.Namespace) -> dict[str, Any]:
    """The peer's loop on a UDP socket, until SIGTERM."""
    stopping = _on_sigterm()
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: never drop a burst
    sock.setsockopt(socket.SOL_SOCKET, 40, 1)  # SO_RXQ_OVFL: count what it drops anyway
    sock.bind((args.bind, args.port))
    sock.setblocking(False)
    Path(args.ready_file).write_text("ready")
    drop, duplicate = set(args.drop), set(args.duplicate)
    delay = dict(_seq_ms(d) for d in args.delay)
    stall_seq, stall_ms = _seq_ms(args.stall) if args.stall else (0, 0.0)
    held: list[tuple[int, int, bytes, Any]] = []  # (release time, order, datagram, sender)
    stalled: list[tuple[bytes, Any]] = []
    stall_until: int | None = None
    done: dict[str, Any] = {"received": 0, "answered": 0, "dropped": 0, "socket_drops": 0}
    done.update(stall_start_ns=None, stall_end_ns=None, stalled=0)
    order = 0
    while not stopping:
        wake = [t for t in (stall_until, held[0][0] if held else None) if t is not None]
        timeout = min([0.05] + [(t - time.monotonic_ns()) / 1e9 for t in wake])
        try:
            select.select([sock], [], [], max(timeout, 0))
        except InterruptedError:
            continue
        while True:
            try:
                data, ancillary, _, sender = sock.recvmsg(MAX_SIZE + 1, 64)
            except BlockingIOError:
                break
            now = time.monotonic_ns()
            for _, _, value in ancillary:
                done["socket_drops"] = int.from_bytes(value[:4], "little")
            done["received"] += 1
            fields = decode(data)
            seq = fields[1] if fields else 0
            if seq in drop:
                drop.discard(seq)
                done["dropped"] += 1
                continue
            if seq and seq == stall_seq and done["stall_start_ns"] is None:
                done["stall_start_ns"] = now
                stall_until = now + int(stall_ms * 1e6)
            if stall_until is not None:
                stalled.append((data, sender))
                continue
            if seq in delay:
                order += 1
                heapq.heappush(held, (now + int(delay.pop(seq) * 1e6), order, data, sender))
                continue
            copies = 2 if seq in duplicate else 1
            duplicate.discard(seq)
            for _ in range(copies):
                sock.sendto(data, sender)
                done["answered"] += 1
        now = time.monotonic_ns()
        if stall_until is not None and now >= stall_until:
            done["stall_end_ns"] = now
            done["stalled"] = len(stalled)
            for data, sender in stalled:
                sock.sendto(data, sender)
                done["answered"] += 1
            stalled.clear()
            stall_until = None
        while held and held[0][0] <= now:
            _, _, data, sender = heapq.heappop(held)
            sock.sendto(data, sender)
            done["answered"] += 1
    return done


_MAC = bytes.fromhex("020000000002")  # the peer's, locally administered
_TUNSETIFF = 0x400454CA
_IFF_TAP_NO_PI = 0x0002 | 0x1000


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _answer(frame: bytes, ip: bytes, port: int) -> tuple[bytes | None, int]:
    """The reply to one Ethernet frame (an ARP request for ``ip``, or a UDP datagram to
    ``ip``:``port``), or None; and the echo stream sequence number the frame carries (0)."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x06" and frame[20:22] == b"\x00\x01" and frame[38:42] == ip:
        sender_mac, sender_ip = frame[22:28], frame[28:32]
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x02" + _MAC + ip + sender_mac + sender_ip
        return sender_mac + _MAC + b"\x08\x06" + arp, 0
    if ethertype != b"\x08\x00" or frame[23] != 17 or frame[30:34] != ip:
        return None, 0
    ihl = (frame[14] & 15) * 4
    udp = frame[14 + ihl :]
    source_port, dest_port, length = struct.unpack_from("!HHH", udp)
    if dest_port != port:
        return None, 0
    payload = udp[8:length]
    fields = decode(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0x4000, 64, 17, 0, ip, frame[26:30]
    )
    header = header[:10] + struct.pack("!H", _ip_checksum(header)) + header[12:]
    reply_udp = struct.pack("!HHHH", port, source_port, 8 + len(payload), 0) + payload
    return frame[6:12] + _MAC + b"\x08\x00" + header + reply_udp, fields[1] if fields else 0


def serve_tap(args: argparse.Namespace) -> dict[str, Any]:
    """A guest behind the tap ``args.tap``: it attaches the tap (IFF_TAP|IFF_NO_PI, as the
    VMM does) and answers ARP and UDP echo for ``args.bind``. A stall stops it reading the
    tap, as a paused VMM does: meanwhile frames wait in the tap's queue (or are dropped when
    it is full)."""
    stopping = _on_sigterm()
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", args.tap.encode(), _IFF_TAP_NO_PI))
    os.set_blocking(fd, False)
    Path(args.ready_file).write_text("ready")
    ip = socket.inet_aton(args.bind)
    stall_seq, stall_ms = _seq_ms(args.stall) if args.stall else (0, 0.0)
    done: dict[str, Any] = {"received": 0, "answered": 0, "stall_start_ns": None}
    done.update(stall_end_ns=None, after_stall=0)
    stalled: bytes | None = None
    while not stopping:
        if stalled is not None:
            remaining = done["stall_start_ns"] + int(stall_ms * 1e6) - time.monotonic_ns()
            if remaining > 0:
                select.select([], [], [], remaining / 1e9)
                continue
            done["stall_end_ns"] = time.monotonic_ns()
            os.write(fd, stalled)
            done["answered"] += 1
            stalled = None
        select.select([fd], [], [], 0.05)
        while stalled is None:
            try:
                frame = os.read(fd, 65536)
            except BlockingIOError:
                break
            done["received"] += 1
            reply, seq = _answer(frame, ip, args.port)
            if reply is None:
                continue
            if seq and seq == stall_seq and done["stall_start_ns"] is None:
                done["stall_start_ns"] = time.monotonic_ns()
                stalled = reply
                continue
            if done["stall_end_ns"] is not None and seq:
                done["after_stall"] += 1
            os.write(fd, reply)
            done["answered"] += 1
    return done


def main() -> int:
    parser = argparse.ArgumentParser(prog="netsupport.py")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="a UDP echo peer that misbehaves on cue")
    echo.add_argument("--bind", default=PEER)
    echo.add_argument("--port", type=int, default=ECHO_PORT)
    echo.add_argument("--ready-file", required=True)
    echo.add_argument("--drop", type=int, action="append", default=[], help="SEQ")
    echo.add_argument("--duplicate", type=int, action="append", default=[], help="SEQ")
    echo.add_argument("--delay", action="append", default=[], help="SEQ:MS")
    echo.add_argument("--stall", help="SEQ:MS: from SEQ on, hold everything for MS ms")
    echo.add_argument("--tap", help="be a guest behind this tap (only --stall applies)")
    args = parser.parse_args()
    print(json.dumps(serve_tap(args) if args.tap else serve(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
