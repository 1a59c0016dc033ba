"""The host side of the built-in ``net`` guest: a network namespace with a tap, an echo
stream that measures loss and the network blackout of a hand-off, and a ping runner.

* :class:`NetNamespace` creates a network namespace (``ip netns add``) holding a persistent
  tap with the host's address (192.0.2.1/24, optionally 2001:db8::1/64) and runs commands in
  it. A VMM started in it (``intrahost run --net tap=tap0``) attaches the tap; the guest,
  192.0.2.2, is then reachable from the namespace and from nowhere else.
* :func:`run_stream` sends sequence-numbered UDP datagrams to the guest's echo port (7) at a
  fixed rate and records every reply: sent, received, lost, duplicated, reordered, the
  longest gap between consecutive replies (the *network blackout*, with its CLOCK_MONOTONIC
  times, comparable with a hand-off's paused and resumed times), round-trip times.
  :func:`run_flood` keeps a window of datagrams outstanding instead, to measure a rate.
  Both run in the calling process's namespace; :class:`EchoStream` runs one in a namespace
  as a child process (``python -m intrahost.vmm.guests.netcheck stream ...``).
* :class:`Ping` runs ``ping`` in a namespace and parses its statistics (:func:`parse_ping`).

Datagram format (network byte order): the magic ``IHNETCK1``, a 32-bit stream id, the 64-bit
sequence number (from 1), the 64-bit send time (CLOCK_MONOTONIC ns), then zero padding up to
the chosen size. An echo peer returns the datagram unchanged.

Nothing here is needed to start a VMM; it uses the standard library only.
"""

from __future__ import annotations

import argparse
import array
import heapq
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError

#: The guest's echo port (RFC 862).
ECHO_PORT = 7
MAGIC = b"IHNETCK1"
HEADER = struct.Struct("!8sIQQ")
MIN_SIZE = HEADER.size
#: The largest payload that fits a 1500-byte MTU unfragmented over IPv4 and IPv6.
MAX_SIZE = 1452
#: The host's addresses on the tap (documentation ranges, RFC 5737 and RFC 3849).
HOST_ADDRESS = "192.0.2.1/24"
HOST_ADDRESS6 = "2001:db8::1/64"
#: At most this many ranges of lost sequence numbers are listed in a report (all are counted).
MAX_LISTED = 64
#: A receive buffer big enough for the burst of replies that follows a long blackout
#: (a 1000-frame tap queue of small datagrams), so the stream's own socket drops nothing.
_RCVBUF = 8 << 20
_SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
_SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
_PROGRESS_EVERY_NS = 50_000_000
_STOP_CHECK_EVERY_NS = 10_000_000
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class NetToolMissing(IntrahostError):
    """A command the network checks run (``ip``, ``ping``) is not installed."""


class NetNamespaceError(IntrahostError):
    """A network namespace or its tap could not be created or used."""


class EchoStreamError(IntrahostError):
    """An echo stream could not run, or its report is unusable."""


class PingError(IntrahostError):
    """``ping`` failed, or its output has no statistics."""


# --- the namespace -------------------------------------------------------------------------------

_names = itertools.count(1)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise NetToolMissing(f"`{tool}` is not installed: install {package}")
    return path


class NetNamespace:
    """A network namespace with a persistent tap, removed on exit (a context manager).

    Its name is ``PREFIX-PID-N``, unique among the namespaces this process creates and those
    of processes running at the same time. In it: ``lo`` up, and ``tap`` (unless None) in
    ``IFF_TAP|IFF_NO_PI`` mode, up, with ``address`` and, if given, ``address6`` (without
    duplicate address detection, so it is usable at once). The tap has no carrier until a
    process attaches it; frames sent to it before then are dropped.
    """

    def __init__(
        self,
        tap: str | None = "tap0",
        *,
        address: str | None = HOST_ADDRESS,
        address6: str | None = None,
        prefix: str = "intrahost-net",
    ) -> None:
        if tap is not None and not _IFNAME.fullmatch(tap):
            raise NetNamespaceError(
                f"bad interface name {tap!r}: 1 to 15 letters, digits, '.', '_' or '-'"
            )
        self.name = f"{prefix}-{os.getpid()}-{next(_names)}"
        self.tap = tap
        self.address = address
        self.address6 = address6
        self._created = False

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r}, tap={self.tap!r})"

    def create(self) -> NetNamespace:
        """Create the namespace and its tap; on failure nothing is left behind."""
        _need("ip", "iproute2")
        self._ip("netns", "add", self.name)
        self._created = True
        try:
            self.ip("link", "set", "lo", "up")
            if self.tap is not None:
                self.ip("tuntap", "add", "dev", self.tap, "mode", "tap")
                if self.address:
                    self.ip("address", "add", self.address, "dev", self.tap)
                if self.address6:
                    self.ip("address", "add", self.address6, "dev", self.tap, "nodad")
                self.ip("link", "set", self.tap, "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Delete the namespace (and so its tap). Calling it again does nothing."""
        if not self._created:
            return
        result = subprocess.run(
            ["ip", "netns", "del", self.name], capture_output=True, text=True, check=False
        )
        if result.returncode and self.exists():
            raise NetNamespaceError(
                f"cannot remove the network namespace {self.name}: {_first_line(result.stderr)}"
            )
        self._created = False

    def exists(self) -> bool:
        """Whether ``ip netns list`` shows the namespace."""
        return self.name in list_namespaces()

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME ARGS...`` and return its output."""
        return self._ip("-n", self.name, *args)

    def add_address(self, address: str, dev: str = "lo") -> None:
        """Add an address to an interface of the namespace (IPv6 without DAD)."""
        extra = ["nodad"] if ":" in address else []
        self.ip("address", "add", address, "dev", dev, *extra)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the namespace (``ip netns exec`` replaces itself with it, so the
        process's pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace to completion, capturing its output as text."""
        result = subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode:
            raise NetNamespaceError(
                f"{' '.join(argv)} failed in {self.name} (status {result.returncode}): "
                f"{_first_line(result.stderr or result.stdout)}"
            )
        return result

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace (keyword arguments go to :class:`subprocess.Popen`)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def _ip(self, *args: str) -> str:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if result.returncode:
            message = _first_line(result.stderr)
            if os.geteuid() != 0:
                raise NetNamespaceError(
                    f"ip {' '.join(args)}: {message} (network namespaces and taps need root, "
                    "or CAP_SYS_ADMIN and CAP_NET_ADMIN)"
                )
            raise NetNamespaceError(f"ip {' '.join(args)}: {message}")
        return result.stdout


def list_namespaces() -> list[str]:
    """The names ``ip netns list`` shows."""
    _need("ip", "iproute2")
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


# --- the echo stream ----------------------------------------------------------------------------


def encode(stream_id: int, seq: int, sent_ns: int, size: int) -> bytes:
    """One datagram of a stream, ``size`` bytes long."""
    return HEADER.pack(MAGIC, stream_id, seq, sent_ns).ljust(size, b"\0")


def decode(data: bytes) -> tuple[int, int, int] | None:
    """(stream id, sequence number, send time) of a stream datagram, or None."""
    if len(data) < HEADER.size or data[:8] != MAGIC:
        return None
    _, stream_id, seq, sent_ns = HEADER.unpack_from(data)
    return stream_id, seq, sent_ns


@dataclass
class Blackout:
    """The longest time without a reply: from the reply ``after_seq`` (received at
    ``start_ns``) to the reply ``before_seq`` (``end_ns``). Not ``recovered``: no reply came
    after it until sending stopped (``end_ns`` is then the last send, ``before_seq`` 0)."""

    ms: float = 0.0
    start_ns: int = 0
    end_ns: int = 0
    after_seq: int = 0
    before_seq: int = 0
    recovered: bool = True


@dataclass
class EchoReport:
    """What an echo stream or flood measured. Times are CLOCK_MONOTONIC ns."""

    mode: str
    to: str
    port: int
    stream_id: int
    size: int
    rate: float | None  # datagrams per second asked for (stream)
    window: int | None  # datagrams kept outstanding (flood)
    start_ns: int  # the first send
    stop_ns: int  # the last send
    sent: int = 0
    received: int = 0  # sequence numbers that came back (at least once)
    lost: int = 0  # sent, never came back within the grace period
    duplicated: int = 0  # further copies of a sequence number already received
    reordered: int = 0  # received after a higher sequence number
    foreign: int = 0  # datagrams that are not this stream's replies
    send_errors: int = 0  # sends the kernel refused (counted as sent and lost)
    socket_drops: int = 0  # replies the stream's own socket dropped (a full receive buffer)
    #: stream: the most a send was late on its deadline. The stream's own process held up
    #: (a loaded host) shows here; a blackout far longer than it is the network's.
    send_lag_ms: float = 0.0
    first_reply_ns: int | None = None
    last_reply_ns: int | None = None
    blackout: Blackout = field(default_factory=Blackout)
    rtt_ms: dict[str, float] = field(default_factory=dict)  # min, p50, p99, max
    sent_per_s: float = 0.0
    received_per_s: float = 0.0
    lost_ranges: list[list[int]] = field(default_factory=list)  # [first, last], MAX_LISTED
    #: The MAX_LISTED longest gaps between consecutive replies, longest first, each
    #: [ns, start_ns, end_ns, after_seq, before_seq] (a recovered ``blackout`` is the first):
    #: a caller that knows when something happened picks the gap around it.
    gaps: list[list[int]] = field(default_factory=list)
    per_second: list[int] = field(default_factory=list)  # flood: replies in each second

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> EchoReport:
        try:
            values = dict(data)
            values["blackout"] = Blackout(**values["blackout"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as error:
            raise EchoStreamError(f"not an echo stream report: {error}") from None

    def summary(self) -> str:
        """A few lines for people."""
        b = self.blackout
        if not self.received:
            when = " (no reply)"
        elif b.recovered:
            when = (
                f" (after seq {b.after_seq} at {b.start_ns} ns, "
                f"until seq {b.before_seq} at {b.end_ns} ns)"
            )
        else:
            when = f" (after seq {b.after_seq} at {b.start_ns} ns, never recovered)"
        lines = [
            f"{self.mode} to {self.to}:{self.port}, {self.size}-byte datagrams: "
            f"{self.sent} sent ({self.sent_per_s:.0f}/s), {self.received} received "
            f"({self.received_per_s:.0f}/s), {self.lost} lost, {self.duplicated} duplicated, "
            f"{self.reordered} reordered",
            f"network blackout: {b.ms:.1f} ms{when}",
        ]
        if self.rtt_ms:
            r = self.rtt_ms
            lines.append(
                f"rtt ms: min {r['min']:.3f}, p50 {r['p50']:.3f}, p99 {r['p99']:.3f}, "
                f"max {r['max']:.3f}"
            )
        if self.lost_ranges:
            ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.lost_ranges)
            lines.append(f"lost sequence numbers: {ranges}")
        if self.send_lag_ms:
            lines.append(f"sends at most {self.send_lag_ms:.1f} ms late")
        if self.send_errors or self.socket_drops or self.foreign:
            lines.append(
                f"{self.send_errors} send errors, {self.socket_drops} dropped by the receiving "
                f"socket, {self.foreign} foreign datagrams"
            )
        return "\n".join(lines)


class _Tally:
    """The receiving side of a stream: every reply, in arrival order."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.seen = bytearray(1 << 12)  # by sequence number: 1 once it came back
        self.received = 0
        self.duplicated = 0
        self.reordered = 0
        self.foreign = 0
        self.max_seq = 0
        self.rtts = array.array("q")
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.last_seq = 0
        self.blackout = Blackout()
        self.gaps: list[tuple[int, int, int, int, int]] = []  # a min-heap, MAX_LISTED long
        self.arrivals = array.array("q")  # flood: arrival times, for replies per second

    def record(self, data: bytes, now: int, sent: int) -> int | None:
        """Count one datagram received at ``now``; return its sequence number if it is a
        first reply of this stream."""
        fields = decode(data)
        if fields is None or fields[0] != self.stream_id or not 0 < fields[1] <= sent:
            self.foreign += 1
            return None
        _, seq, sent_ns = fields
        if seq >= len(self.seen):
            self.seen.extend(bytes(max(seq + 1, 2 * len(self.seen)) - len(self.seen)))
        if self.seen[seq]:
            self.duplicated += 1
            return None
        self.seen[seq] = 1
        self.received += 1
        if seq < self.max_seq:
            self.reordered += 1
        self.max_seq = max(self.max_seq, seq)
        self.rtts.append(now - sent_ns)
        if self.last_ns is None:
            self.first_ns = now
        else:
            gap = (now - self.last_ns, self.last_ns, now, self.last_seq, seq)
            if len(self.gaps) < MAX_LISTED:
                heapq.heappush(self.gaps, gap)
            elif gap > self.gaps[0]:
                heapq.heapreplace(self.gaps, gap)
        if self.last_ns is not None and now - self.last_ns > self.blackout.ms * 1e6:
            self.blackout = Blackout(
                (now - self.last_ns) / 1e6, self.last_ns, now, self.last_seq, seq
            )
        self.last_ns, self.last_seq = now, seq
        return seq

    def report(
        self,
        *,
        mode: str,
        to: str,
        port: int,
        size: int,
        rate: float | None,
        window: int | None,
        start_ns: int,
        stop_ns: int,
        sent: int,
        send_errors: int,
        socket_drops: int,
    ) -> EchoReport:
        report = EchoReport(
            mode=mode,
            to=to,
            port=port,
            stream_id=self.stream_id,
            size=size,
            rate=rate,
            window=window,
            start_ns=start_ns,
            stop_ns=stop_ns,
            sent=sent,
            received=self.received,
            lost=sent - self.received,
            duplicated=self.duplicated,
            reordered=self.reordered,
            foreign=self.foreign,
            send_errors=send_errors,
            socket_drops=socket_drops,
            first_reply_ns=self.first_ns,
            last_reply_ns=self.last_ns,
            blackout=self.blackout,
            gaps=[list(gap) for gap in sorted(self.gaps, reverse=True)],
        )
        if self.last_ns is None:
            report.blackout = Blackout((stop_ns - start_ns) / 1e6, start_ns, stop_ns, 0, 0, False)
        elif self.max_seq < sent and stop_ns - self.last_ns > self.blackout.ms * 1e6:
            # The replies stopped and never came back before sending stopped.
            report.blackout = Blackout(
                (stop_ns - self.last_ns) / 1e6, self.last_ns, stop_ns, self.last_seq, 0, False
            )
        if self.rtts:
            rtts = sorted(self.rtts)
            report.rtt_ms = {
                "min": rtts[0] / 1e6,
                "p50": _percentile(rtts, 50) / 1e6,
                "p99": _percentile(rtts, 99) / 1e6,
                "max": rtts[-1] / 1e6,
            }
        elapsed = (stop_ns - start_ns) / 1e9
        if elapsed > 0:
            report.sent_per_s = sent / elapsed
        if self.first_ns is not None and self.last_ns is not None and self.last_ns > start_ns:
            report.received_per_s = self.received / ((self.last_ns - start_ns) / 1e9)
        report.lost_ranges = self._lost_ranges(sent)
        if self.arrivals:
            seconds = [0] * ((self.arrivals[-1] - start_ns) // 1_000_000_000 + 1)
            for at in self.arrivals:
                seconds[(at - start_ns) // 1_000_000_000] += 1
            report.per_second = seconds
        return report

    def _lost_ranges(self, sent: int) -> list[list[int]]:
        """The first MAX_LISTED runs of sequence numbers (1 to ``sent``) that never came back."""
        seen = self.seen
        if len(seen) <= sent:
            seen.extend(bytes(sent + 1 - len(seen)))
        ranges: list[list[int]] = []
        seq = seen.find(0, 1, sent + 1)
        while seq > 0 and len(ranges) < MAX_LISTED:
            back = seen.find(1, seq, sent + 1)
            last = sent if back < 0 else back - 1
            ranges.append([seq, last])
            seq = seen.find(0, last + 1, sent + 1)
        return ranges


def _percentile(ordered: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty sequence."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


class _Endpoint:
    """The stream's UDP socket, unconnected (an ICMP error does not fail a send), with a
    large receive buffer and the kernel's count of datagrams it dropped."""

    def __init__(self, to: str, port: int) -> None:
        try:
            info = socket.getaddrinfo(to, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise EchoStreamError(f"{to!r} is not an IPv4 or IPv6 address") from None
        family, _, _, _, address = info[0]
        self.address: tuple[Any, ...] = address
        self.peer = str(address[0])
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
        self.drops = 0
        self.send_errors = 0

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.address)
        except OSError:
            # ENOBUFS, EHOSTUNREACH, ...: the datagram is counted as sent, and so lost.
            self.send_errors += 1

    def receive(self) -> list[tuple[bytes, int]]:
        """Every datagram waiting, from the peer, with its arrival time (now)."""
        got: list[tuple[bytes, int]] = []
        while True:
            try:
                data, ancillary, _, source = self.sock.recvmsg(MAX_SIZE + 1, 64)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                continue  # a queued ICMP error; the datagram it concerns is simply lost
            now = time.monotonic_ns()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(value) >= 4:
                    self.drops = struct.unpack("I", value[:4])[0]
            got.append((data if source[0] == self.peer else b"", now))

    def wait(self, timeout_ns: int) -> None:
        if timeout_ns > 0:
            select.select([self.sock], [], [], timeout_ns / 1e9)

    def close(self) -> None:
        self.sock.close()


class _Progress:
    """A small JSON file, replaced atomically, that tells another process how far a stream is."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.next_ns = 0

    def write(self, now: int, start_ns: int, sent: int, tally: _Tally, final: bool = False) -> None:
        if self.path is None or (now < self.next_ns and not final):
            return
        self.next_ns = now + _PROGRESS_EVERY_NS
        data = {
            "start_ns": start_ns,
            "now_ns": now,
            "sent": sent,
            "received": tally.received,
            "last_reply_ns": tally.last_ns,
            "done": final,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def _check_common(size: int, duration: float | None, grace: float) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise EchoStreamError(
            f"the datagram size must be {MIN_SIZE} to {MAX_SIZE} bytes, not {size}"
        )
    if duration is not None and duration <= 0:
        raise EchoStreamError(f"the duration must be positive, not {duration}")
    if grace < 0:
        raise EchoStreamError(f"the grace period cannot be negative ({grace})")


def _stopper(
    duration: float | None, stop: Callable[[], bool] | None, start_ns: int
) -> Callable[[int], bool]:
    end_ns = start_ns + int(duration * 1e9) if duration is not None else None
    next_check = [0]

    def stopped(now: int) -> bool:
        if end_ns is not None and now >= end_ns:
            return True
        if stop is not None and now >= next_check[0]:
            next_check[0] = now + _STOP_CHECK_EVERY_NS
            return stop()
        return False

    return stopped


def _linger(
    ep: _Endpoint,
    tally: _Tally,
    sent: int,
    grace: float,
    on_reply: Callable[[int], None] | None = None,
) -> None:
    """After the last send, take replies for up to ``grace`` seconds, or until every
    datagram came back."""
    deadline = time.monotonic_ns() + int(grace * 1e9)
    while tally.received < sent:
        now = time.monotonic_ns()
        if now >= deadline:
            break
        ep.wait(deadline - now)
        for data, at in ep.receive():
            if tally.record(data, at, sent) is not None and on_reply is not None:
                on_reply(at)


def _final_report(
    ep: _Endpoint,
    tally: _Tally,
    prog: _Progress,
    mode: str,
    to: str,
    port: int,
    size: int,
    rate: float | None,
    window: int | None,
    start_ns: int,
    stop_ns: int,
    sent: int,
) -> EchoReport:
    """The run's report (with the endpoint's send errors and socket drops), its progress
    written a last time."""
    report = tally.report(
        mode=mode,
        to=to,
        port=port,
        size=size,
        rate=rate,
        window=window,
        start_ns=start_ns,
        stop_ns=stop_ns,
        sent=sent,
        send_errors=ep.send_errors,
        socket_drops=ep.drops,
    )
    prog.write(time.monotonic_ns(), start_ns, sent, tally, final=True)
    return report


def run_stream(
    to: str,
    *,
    port: int = ECHO_PORT,
    rate: float = 2000.0,
    size: int = 64,
    duration: float | None = None,
    stop: Callable[[], bool] | None = None,
    grace: float = 1.0,
    stream_id: int | None = None,
    progress: str | Path | None = None,
) -> EchoReport:
    """Send datagrams to ``to``:``port`` at ``rate`` per second for ``duration`` seconds
    (``rate * duration`` datagrams), or until ``stop()`` returns true (checked every 10 ms),
    and record the replies.

    Datagram *k* (from 0) is due at ``start + k / rate``: the pacing follows absolute
    deadlines, so it does not drift; a sender held up (a descheduled process) sends the
    datagrams it owes at once. Replies are taken between sends. After the last send, the
    stream waits up to ``grace`` seconds for late replies; what has not come back by then is
    lost. ``progress`` names a file rewritten every 50 ms with the counts so far.
    """
    _check_common(size, duration, grace)
    if not 0 < rate <= 1_000_000:
        raise EchoStreamError(
            f"the rate must be above 0 and at most 1000000 per second, not {rate}"
        )
    sid = stream_id if stream_id is not None else int.from_bytes(os.urandom(4), "little")
    period = 1e9 / rate
    ep = _Endpoint(to, port)
    tally = _Tally(sid)
    prog = _Progress(progress)
    try:
        start_ns = last_send = time.monotonic_ns()
        stopped = _stopper(None, stop, start_ns)
        # With a duration: the datagrams due before it ends, sent even if the sender is late.
        total = math.ceil(duration * rate - 1e-6) if duration is not None else None
        sent = lag = 0
        while True:
            now = time.monotonic_ns()
            if stopped(now):
                break
            while (total is None or sent < total) and start_ns + int(sent * period) <= now:
                last_send = time.monotonic_ns()
                lag = max(lag, last_send - start_ns - int(sent * period))
                sent += 1
                ep.send(encode(sid, sent, last_send, size))
            if total is not None and sent >= total:
                break
            for data, at in ep.receive():
                tally.record(data, at, sent)
            prog.write(now, start_ns, sent, tally)
            ep.wait(min(start_ns + int(sent * period) - time.monotonic_ns(), _STOP_CHECK_EVERY_NS))
        _linger(ep, tally, sent, grace)
        report = _final_report(
            ep, tally, prog, "stream", to, port, size, rate, None, start_ns, last_send, sent
        )
        report.send_lag_ms = lag / 1e6
        return report
    finally:
        ep.close()


def run_flood(
    to: str,
    *,
    port: int = ECHO_PORT,
    window: int = 64,
    size: int = 64,
    duration: float | None = None,
    stop: Callable[[], bool] | None = None,
    timeout: float = 0.2,
    grace: float = 1.0,
    stream_id: int | None = None,
    progress: str | Path | None = None,
) -> EchoReport:
    """Keep ``window`` datagrams outstanding: each reply releases the next send, and a
    datagram not answered within ``timeout`` seconds gives its place to a new one (it counts
    as lost unless its reply still comes). The report's ``per_second`` lists the replies in
    each second since the start; ``received_per_s`` is the echo rate."""
    _check_common(size, duration, grace)
    if not 1 <= window <= 65536:
        raise EchoStreamError(f"the window must be 1 to 65536 datagrams, not {window}")
    if timeout <= 0:
        raise EchoStreamError(f"the timeout must be positive, not {timeout}")
    sid = stream_id if stream_id is not None else int.from_bytes(os.urandom(4), "little")
    timeout_ns = int(timeout * 1e9)
    ep = _Endpoint(to, port)
    tally = _Tally(sid)
    prog = _Progress(progress)
    outstanding: dict[int, int] = {}  # seq -> send time, in send order
    try:
        start_ns = last_send = time.monotonic_ns()
        stopped = _stopper(duration, stop, start_ns)
        sent = 0
        while True:
            now = time.monotonic_ns()
            if stopped(now):
                break
            for seq, at in list(outstanding.items()):
                if now - at < timeout_ns:
                    break
                del outstanding[seq]
            while len(outstanding) < window:
                sent += 1
                last_send = time.monotonic_ns()
                ep.send(encode(sid, sent, last_send, size))
                outstanding[sent] = last_send
            ep.wait(_STOP_CHECK_EVERY_NS)
            for data, at in ep.receive():
                answered = tally.record(data, at, sent)
                if answered is not None:
                    tally.arrivals.append(at)
                    outstanding.pop(answered, None)
            prog.write(now, start_ns, sent, tally)
        _linger(ep, tally, sent, grace, tally.arrivals.append)
        return _final_report(
            ep, tally, prog, "flood", to, port, size, None, window, start_ns, last_send, sent
        )
    finally:
        ep.close()


class EchoStream(Closeable):
    """An echo stream (or flood) run as a child process, in a namespace or (``netns`` None)
    in this process's own; a context manager that kills it if it is still running.

    ``start()``, then optionally ``wait_replies(n)`` (traffic flows), then ``stop()`` (or let
    ``duration`` run out) and ``report()``.
    """

    def __init__(
        self,
        netns: NetNamespace | None,
        to: str,
        *,
        mode: str = "stream",
        port: int = ECHO_PORT,
        rate: float = 2000.0,
        window: int = 64,
        size: int = 64,
        duration: float | None = None,
        grace: float = 1.0,
    ) -> None:
        if mode not in ("stream", "flood"):
            raise EchoStreamError(f"the mode is 'stream' or 'flood', not {mode!r}")
        self.netns = netns
        self._dir = Path(tempfile.mkdtemp(prefix="intrahost-netcheck-"))
        self.progress_path = self._dir / "progress.json"
        argv = [sys.executable, "-m", "intrahost.vmm.guests.netcheck", mode, "--to", to]
        argv += ["--port", str(port), "--size", str(size), "--grace", str(grace)]
        argv += ["--rate", str(rate)] if mode == "stream" else ["--window", str(window)]
        if duration is not None:
            argv += ["--duration", str(duration)]
        argv += ["--progress-file", str(self.progress_path), "--json"]
        self.argv = argv
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> EchoStream:
        return self.start()

    def start(self) -> EchoStream:
        options: dict[str, Any] = {
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "stdin": subprocess.DEVNULL,
            "text": True,
        }
        if self.netns is not None:
            self.proc = self.netns.popen(self.argv, **options)
        else:
            self.proc = subprocess.Popen(self.argv, **options)
        return self

    def progress(self) -> dict[str, Any] | None:
        """The counts so far (``sent``, ``received``, ``last_reply_ns``, ...), or None before
        the stream's first update."""
        try:
            data: dict[str, Any] = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def wait_replies(self, count: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``count`` replies came back; return the progress then."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.progress()
            if now is not None and now["received"] >= count:
                return now
            proc = self._proc()
            if proc.poll() is not None:
                raise EchoStreamError(
                    f"the echo stream exited (status {proc.returncode}) before {count} replies: "
                    f"{_first_line(proc.stderr.read() if proc.stderr else '')}"
                )
            if time.monotonic() > deadline:
                got = now["received"] if now else 0
                raise EchoStreamError(f"{got} replies after {timeout:g} s, waiting for {count}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Tell the stream to stop sending (SIGTERM); it still waits its grace period."""
        proc = self._proc()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def report(self, timeout: float = 60.0) -> EchoReport:
        """Wait for the stream to end and return its report."""
        proc = self._proc()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EchoStreamError(f"the echo stream did not end within {timeout:g} s") from None
        if proc.returncode:
            raise EchoStreamError(
                f"the echo stream failed (status {proc.returncode}): {_first_line(err)}"
            )
        try:
            return EchoReport.from_json(json.loads(out))
        except ValueError:
            raise EchoStreamError(
                f"the echo stream printed no report: {_first_line(out)}"
            ) from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _proc(self) -> subprocess.Popen[str]:
        if self.proc is None:
            raise EchoStreamError("the echo stream was not started")
        return self.proc


# --- ping ---------------------------------------------------------------------------------------

_PING_COUNTS = re.compile(
    r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?"
    r"(?:, \+(\d+) errors)?, ([\d.]+)% packet loss(?:, time (\d+)ms)?"
)
_PING_RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


@dataclass(frozen=True)
class PingReport:
    """The statistics ``ping`` prints at its end; the RTT figures are None without a reply."""

    transmitted: int
    received: int
    duplicates: int
    errors: int
    loss_percent: float
    time_ms: int | None
    rtt_min_ms: float | None = None
    rtt_avg_ms: float | None = None
    rtt_max_ms: float | None = None
    rtt_mdev_ms: float | None = None

    @property
    def lost(self) -> int:
        return self.transmitted - self.received


def parse_ping(output: str) -> PingReport:
    """Parse iputils ``ping``'s final statistics."""
    counts = _PING_COUNTS.search(output)
    if counts is None:
        raise PingError(f"ping printed no statistics: {_first_line(output)}")
    rtt = _PING_RTT.search(output)
    figures: list[float | None] = [float(v) for v in rtt.groups()] if rtt else [None] * 4
    return PingReport(
        transmitted=int(counts[1]),
        received=int(counts[2]),
        duplicates=int(counts[3] or 0),
        errors=int(counts[4] or 0),
        loss_percent=float(counts[5]),
        time_ms=int(counts[6]) if counts[6] else None,
        rtt_min_ms=figures[0],
        rtt_avg_ms=figures[1],
        rtt_max_ms=figures[2],
        rtt_mdev_ms=figures[3],
    )


class Ping:
    """``ping -q -i INTERVAL [-c COUNT] ADDRESS`` in a namespace (or, ``netns`` None, this
    process's own), until ``count`` replies or ``stop()``. An interval below 0.2 s needs root."""

    def __init__(
        self,
        netns: NetNamespace | None,
        address: str,
        *,
        interval: float = 0.002,
        count: int | None = None,
        size: int | None = None,
        wait: float = 1.0,
    ) -> None:
        _need("ping", "iputils-ping")
        argv = ["ping", "-q", "-n", "-i", f"{interval:g}", "-W", f"{wait:g}"]
        if count is not None:
            argv += ["-c", str(count)]
        if size is not None:
            argv += ["-s", str(size)]
        self.argv = [*argv, address]
        self.netns = netns
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Ping:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def start(self) -> Ping:
        options: dict[str, Any] = {
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "stdin": subprocess.DEVNULL,
            "text": True,
        }
        argv = self.netns.command(self.argv) if self.netns is not None else self.argv
        self.proc = subprocess.Popen(argv, **options)
        return self

    def stop(self) -> None:
        """Stop sending (SIGINT: ping prints its statistics and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def report(self, timeout: float = 60.0) -> PingReport:
        """Wait for ping to end and parse its statistics. No reply at all is a report (100%
        loss), not an error; ping's own errors (status 2) raise :class:`PingError`."""
        if self.proc is None:
            raise PingError("ping was not started")
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PingError(f"ping did not end within {timeout:g} s") from None
        if self.proc.returncode not in (0, 1):
            raise PingError(
                f"ping failed (status {self.proc.returncode}): {_first_line(err or out)}"
            )
        return parse_ping(out)


def ping(
    netns: NetNamespace | None,
    address: str,
    count: int,
    *,
    interval: float = 0.002,
    timeout: float = 60.0,
) -> PingReport:
    """Send ``count`` pings ``interval`` seconds apart and return the statistics."""
    with Ping(netns, address, interval=interval, count=count) as runner:
        return runner.report(timeout)


# --- python -m intrahost.vmm.guests.netcheck -----------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m intrahost.vmm.guests.netcheck",
        description="UDP echo streams against the built-in net guest (run it in the guest's "
        "network namespace). It stops after --duration, when --stop-file exists, or on "
        "SIGTERM/SIGINT, then waits --grace seconds for late replies and prints its report.",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, text in (
        ("stream", "datagrams at a fixed rate: loss, duplicates, reordering, the blackout"),
        ("flood", "a window of outstanding datagrams: the echo rate"),
    ):
        p = sub.add_parser(mode, help=text)
        p.add_argument("--to", required=True, help="the guest's address, e.g. 192.0.2.2")
        p.add_argument("--port", type=int, default=ECHO_PORT)
        p.add_argument("--size", type=int, default=64, help="datagram payload bytes")
        if mode == "stream":
            p.add_argument("--rate", type=float, default=2000.0, help="datagrams per second")
        else:
            p.add_argument("--window", type=int, default=64, help="datagrams outstanding")
            p.add_argument("--timeout", type=float, default=0.2, help="seconds before one is lost")
        p.add_argument("--duration", type=float, help="seconds (default: until stopped)")
        p.add_argument("--stop-file", help="stop when this file exists")
        p.add_argument("--grace", type=float, default=1.0, help="seconds to wait for late replies")
        p.add_argument("--stream-id", type=int, help="default: random")
        p.add_argument("--progress-file", help="rewrite this file with the counts every 50 ms")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    interrupted = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop_file = Path(args.stop_file) if args.stop_file else None

    def stop() -> bool:
        return bool(interrupted) or (stop_file is not None and stop_file.exists())

    common: dict[str, Any] = {
        "port": args.port,
        "size": args.size,
        "duration": args.duration,
        "stop": stop,
        "grace": args.grace,
        "stream_id": args.stream_id,
        "progress": args.progress_file,
    }
    try:
        if args.mode == "stream":
            report = run_stream(args.to, rate=args.rate, **common)
        else:
            report = run_flood(args.to, window=args.window, timeout=args.timeout, **common)
    except (IntrahostError, OSError) as error:
        print(f"netcheck: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json()) if args.json else report.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
