"""The host side of the net guest (intrahost/vmm/guests/netcheck.py) against a real UDP echo
peer that misbehaves on cue (tests/netsupport.py), and a real ping, in a namespace of the
test's own: every fault the peer commits is counted exactly, a stall shows as a blackout of
its length at its time, and no namespace outlives its test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netsupport import PEER, EchoPeer, needs_netns
from support import PATIENCE, wait_until

from intrahost.vmm.guests import netcheck
from intrahost.vmm.guests.netcheck import (
    MAX_LISTED,
    EchoReport,
    EchoStream,
    NetNamespace,
    NetNamespaceError,
    NetToolMissing,
    list_namespaces,
)

pytestmark = needs_netns
needs_ping = pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils-ping)")

RATE = 2000


def _stream(
    netns: NetNamespace, duration: float = 1.0, to: str = PEER, **options: object
) -> EchoReport:
    with EchoStream(netns, to, rate=RATE, duration=duration, **options) as stream:  # type: ignore[arg-type]
        return stream.report(PATIENCE)


@pytest.fixture
def peer_ns(netns: NetNamespace) -> NetNamespace:
    """The namespace, with the peer's address on lo."""
    netns.add_address(f"{PEER}/32")
    return netns


# --- the namespace --------------------------------------------------------------------------------


def test_namespace_has_the_tap_and_is_removed() -> None:
    with NetNamespace("tap0", address6="2001:db8::1/64") as ns, NetNamespace("tap0") as other:
        assert ns.name != other.name
        assert {ns.name, other.name} <= set(list_namespaces())
        link = ns.ip("-d", "link", "show", "tap0")
        assert "tun type tap pi off" in link and "persist on" in link and ",UP" in link
        addresses = ns.ip("address", "show", "dev", "tap0")
        assert "192.0.2.1/24" in addresses and "2001:db8::1/64" in addresses
        assert "UP" in ns.ip("link", "show", "lo")
        assert ns.run(["cat", "/proc/net/dev"]).stdout.count("tap0") == 1
        assert subprocess.run(["ip", "link", "show", "tap0"], capture_output=True).returncode
    assert ns.name not in list_namespaces() and other.name not in list_namespaces()
    ns.remove()  # again: nothing to do


def test_a_failed_creation_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    ns = NetNamespace("tap0", address="192.0.2.300/24")
    with pytest.raises(NetNamespaceError, match=r"ip -n intrahost-net-\d+-\d+ address add"):
        ns.create()
    assert ns.name not in list_namespaces()
    with pytest.raises(NetNamespaceError, match="bad interface name"):
        NetNamespace("a-name-longer-than-15")


def test_missing_ip_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NetToolMissing, match=r"^`ip` is not installed: install iproute2$"):
        NetNamespace().create()
    with pytest.raises(NetToolMissing, match=r"^`ping` is not installed: install iputils-ping$"):
        netcheck.Ping(None, "192.0.2.1")


def test_without_root_the_error_says_so(tmp_path: Path) -> None:
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs setpriv (util-linux)")
    code = "from intrahost.vmm.guests.netcheck import NetNamespace; NetNamespace().create()"
    result = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(netcheck.__file__).parents[3])},
        cwd=tmp_path,
        check=False,
    )
    assert "NetNamespaceError" in result.stderr, result.stderr
    assert "network namespaces and taps need root" in result.stderr.splitlines()[-1]


# --- the echo stream ------------------------------------------------------------------------------


def test_a_clean_stream_loses_nothing(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns) as peer:
        report = _stream(peer_ns)
        did = peer.stop()
    assert report.sent == RATE  # one second at 2000/s, by deadlines
    assert (report.received, report.lost, report.duplicated, report.reordered) == (RATE, 0, 0, 0)
    assert report.foreign == report.send_errors == report.socket_drops == 0
    assert did["received"] == did["answered"] == RATE
    assert report.blackout.recovered and report.blackout.ms < 1000
    assert 0 < report.rtt_ms["min"] <= report.rtt_ms["p50"] <= report.rtt_ms["p99"]
    assert report.rtt_ms["p99"] <= report.rtt_ms["max"]
    assert report.first_reply_ns is not None and report.start_ns < report.first_reply_ns
    assert 0.9 * RATE < report.sent_per_s < 1.1 * RATE
    assert report.lost_ranges == []
    assert 0 <= report.send_lag_ms < PATIENCE * 1000
    assert EchoReport.from_json(report.to_json()) == report


def test_dropped_datagrams_are_lost(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns, drop=[100, 101, 1500]) as peer:
        report = _stream(peer_ns)
        assert peer.stop()["dropped"] == 3
    assert (report.sent, report.received, report.lost) == (RATE, RATE - 3, 3)
    assert report.lost_ranges == [[100, 101], [1500, 1500]]
    assert report.duplicated == report.reordered == 0
    assert "lost sequence numbers: 100-101, 1500" in report.summary()


def test_duplicates_are_counted_once_each(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns, duplicate=[10, 700]) as peer:
        report = _stream(peer_ns)
        assert peer.stop()["answered"] == RATE + 2
    assert (report.received, report.lost, report.duplicated, report.reordered) == (RATE, 0, 2, 0)


def test_a_delayed_datagram_is_reordered_not_lost(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns, delay={300: 20.0, 900: 20.0}) as peer:
        report = _stream(peer_ns)
        peer.stop()
    assert (report.received, report.lost, report.duplicated, report.reordered) == (RATE, 0, 0, 2)
    assert report.rtt_ms["max"] >= 20.0


def test_a_late_reply_within_the_grace_period_is_not_lost(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns, delay={RATE: 300.0}) as peer:
        report = _stream(peer_ns, grace=2.0)
        peer.stop()
    assert (report.received, report.lost) == (RATE, 0)
    assert report.rtt_ms["max"] >= 300.0


def test_a_stall_is_a_blackout_of_its_length_at_its_time(peer_ns: NetNamespace) -> None:
    """The peer holds every datagram from seq 1000 on for 200 ms, then answers them all in
    order: what a paused VMM's tap queue does. Nothing is lost or reordered; the blackout is
    the stall, between the replies to 999 and 1000, around the peer's stall times."""
    with EchoPeer(peer_ns, stall=(1000, 200.0)) as peer:
        report = _stream(peer_ns)
        did = peer.stop()
    assert (report.received, report.lost, report.duplicated, report.reordered) == (RATE, 0, 0, 0)
    b = report.blackout
    assert (b.after_seq, b.before_seq, b.recovered) == (999, 1000, True)
    assert 200.0 <= b.ms < 1200.0  # 200 ms, and (a loaded host) at most 1 s late
    # The reply to 999 may reach the stream just after the peer took 1000: 100 ms of slack.
    assert abs(b.start_ns - did["stall_start_ns"]) < 100_000_000
    assert b.start_ns < did["stall_end_ns"] <= b.end_ns < did["stall_end_ns"] + 100_000_000
    assert did["stalled"] > 300  # the datagrams sent during the stall waited, and came back
    assert f"network blackout: {b.ms:.1f} ms (after seq 999" in report.summary()
    # The longest gaps, longest first: the stall's leads; each is between consecutive replies.
    assert report.gaps[0] == [b.end_ns - b.start_ns, b.start_ns, b.end_ns, 999, 1000]
    assert len(report.gaps) == MAX_LISTED
    assert [g[0] for g in report.gaps] == sorted((g[0] for g in report.gaps), reverse=True)
    assert all(g[0] == g[2] - g[1] > 0 and g[4] == g[3] + 1 for g in report.gaps[1:])


def test_no_peer_means_everything_lost_and_no_recovery(peer_ns: NetNamespace) -> None:
    report = _stream(peer_ns, duration=0.2, grace=0.2)
    assert report.sent == 400 and report.received == 0 and report.lost == 400
    assert report.lost_ranges == [[1, 400]]
    assert not report.blackout.recovered and report.blackout.ms > 150
    assert report.rtt_ms == {}


def test_stop_by_signal_and_progress(peer_ns: NetNamespace) -> None:
    with EchoPeer(peer_ns) as peer, EchoStream(peer_ns, PEER, rate=RATE) as stream:
        now = stream.wait_replies(500, PATIENCE)
        assert now["sent"] >= now["received"] >= 500 and not now["done"]
        stream.stop()
        report = stream.report(PATIENCE)
        peer.stop()
    assert report.sent >= 500 and report.lost == 0 and report.received == report.sent
    assert stream.progress() is None  # its directory is gone with it


def test_stop_file_from_the_command_line(peer_ns: NetNamespace, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    argv = [sys.executable, "-m", "intrahost.vmm.guests.netcheck", "stream", "--to", PEER]
    argv += ["--rate", "1000", "--stop-file", str(stop), "--grace", "0.5"]
    progress = tmp_path / "progress.json"
    with EchoPeer(peer_ns) as peer:
        proc = peer_ns.popen(
            [*argv, "--progress-file", str(progress)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(
            lambda: (
                proc.poll() is not None
                or (progress.exists() and json.loads(progress.read_text())["received"] >= 300)
            ),
            "300 replies",
        )
        stop.touch()
        out, err = proc.communicate(timeout=PATIENCE)
        peer.stop()
    assert proc.returncode == 0, err
    first = out.splitlines()[0]
    assert first.startswith("stream to 192.0.2.2:7, 64-byte datagrams:") and " 0 lost" in first
    assert "network blackout:" in out and "rtt ms: min" in out


def test_command_line_errors_are_one_line(peer_ns: NetNamespace) -> None:
    argv = [sys.executable, "-m", "intrahost.vmm.guests.netcheck", "stream", "--to"]
    for args, message in (
        (["192.0.2.2", "--size", "10"], "the datagram size must be 28 to 1452 bytes, not 10"),
        (["example.org"], "'example.org' is not an IPv4 or IPv6 address"),
        (["192.0.2.2", "--rate", "0"], "the rate must be above 0"),
    ):
        result = peer_ns.run(argv + args, check=False)
        assert result.returncode == 1
        assert result.stderr.startswith(f"netcheck: {message}") and result.stderr.count("\n") == 1


def test_ipv6_stream(netns: NetNamespace) -> None:
    netns.add_address("2001:db8::2/128")
    with EchoPeer(netns, bind="2001:db8::2", drop=[7]) as peer:
        report = _stream(netns, duration=0.25, to="2001:db8::2")
        peer.stop()
    assert (report.sent, report.received, report.lost) == (500, 499, 1)


def test_flood_counts_echoes_per_second(peer_ns: NetNamespace) -> None:
    with (
        EchoPeer(peer_ns, drop=[50]) as peer,
        EchoStream(peer_ns, PEER, mode="flood", window=16, duration=1.0) as flood,
    ):
        report = flood.report(PATIENCE)
        peer.stop()
    assert report.mode == "flood" and report.window == 16
    assert report.lost == 1 and report.lost_ranges == [[50, 50]]
    assert report.received == report.sent - 1 > 1000  # the window refilled after the loss
    assert sum(report.per_second) == report.received
    assert report.received_per_s > 1000


def _tx_dropped(netns: NetNamespace) -> int:
    return int(netns.run(["cat", "/sys/class/net/tap0/statistics/tx_dropped"]).stdout)


def test_through_the_tap_a_pause_is_a_blackout_and_nothing_is_lost(netns: NetNamespace) -> None:
    """The peer is a guest behind tap0 (it attaches the tap, answers ARP and UDP echo) and
    stops reading the tap for 200 ms at seq 1000, as a paused VMM does: the 400 datagrams
    sent meanwhile wait in the tap's queue (1000 frames) and all come back."""
    with EchoPeer(netns, tap="tap0", stall=(1000, 200.0)) as peer:
        before = _tx_dropped(netns)  # (a detached tap drops what the host sends it)
        report = _stream(netns)
        dropped = _tx_dropped(netns) - before
        did = peer.stop()
    assert (report.sent, report.received, report.lost, report.duplicated) == (RATE, RATE, 0, 0)
    b = report.blackout
    assert (b.after_seq, b.before_seq) == (999, 1000) and 200.0 <= b.ms < 1200.0
    assert b.start_ns < did["stall_end_ns"] <= b.end_ns < did["stall_end_ns"] + 100_000_000
    assert dropped == 0


def test_through_the_tap_a_pause_beyond_its_queue_loses_the_overflow(
    netns: NetNamespace,
) -> None:
    """With a 100-frame tap queue, a 200 ms pause at 2000/s overflows it: the datagrams
    the tap dropped (its TX drops) are the stream's losses, and the stream recovers."""
    netns.ip("link", "set", "tap0", "txqueuelen", "100")
    with EchoPeer(netns, tap="tap0", stall=(1000, 200.0)) as peer:
        before = _tx_dropped(netns)
        report = _stream(netns)
        dropped = _tx_dropped(netns) - before
        peer.stop()
    assert 100 < report.lost <= dropped  # other frames (IPv6 neighbour discovery) may be too
    assert report.received == RATE - report.lost and report.blackout.recovered
    assert report.lost_ranges[0][0] > 1000 and report.lost_ranges[-1][1] < RATE


# --- ping -----------------------------------------------------------------------------------------


@needs_ping
def test_ping_counts_replies(netns: NetNamespace) -> None:
    report = netcheck.ping(netns, "192.0.2.1", 100)
    assert (report.transmitted, report.received, report.loss_percent) == (100, 100, 0.0)
    assert report.rtt_min_ms is not None and report.rtt_max_ms is not None
    assert 0 < report.rtt_min_ms <= report.rtt_max_ms
    assert report.time_ms is not None and report.time_ms < 100 * 2 * 10
    six = netcheck.ping(netns, "2001:db8::1", 10)
    assert six.received == 10


@needs_ping
def test_ping_without_answer_is_full_loss(netns: NetNamespace) -> None:
    report = netcheck.ping(netns, "192.0.2.99", 5)  # nobody: the tap has no carrier
    assert (report.transmitted, report.received, report.lost) == (5, 0, 5)
    assert report.loss_percent == 100.0 and report.rtt_avg_ms is None


@needs_ping
def test_ping_until_stopped(netns: NetNamespace) -> None:
    with netcheck.Ping(netns, "192.0.2.1") as runner:
        assert runner.proc is not None
        pid = runner.proc.pid

        def handles_sigint() -> bool:  # ping has set up: SIGINT now prints its statistics
            status = Path(f"/proc/{pid}/status").read_text()
            caught = int(status.split("SigCgt:")[1].split()[0], 16)
            return bool(caught & (1 << 1))

        wait_until(handles_sigint, "ping to catch SIGINT")
        runner.stop()
        report = runner.report(PATIENCE)
    assert report.transmitted >= 1 and report.received >= report.transmitted - 1


@needs_ping
def test_ping_errors_and_other_formats(netns: NetNamespace) -> None:
    with pytest.raises(netcheck.PingError, match=r"^ping failed \(status 2\): .*unreachable"):
        netcheck.ping(netns, "2001:db8:ffff::1", 1)  # no route to it in the namespace
    text = (
        "--- 192.0.2.2 ping statistics ---\n"
        "20 packets transmitted, 18 received, +2 duplicates, +1 errors, 10% packet loss, "
        "time 41ms\nrtt min/avg/max/mdev = 0.011/0.020/0.051/0.009 ms, pipe 2\n"
    )
    report = netcheck.parse_ping(text)
    assert (report.transmitted, report.received, report.duplicates, report.errors) == (
        20,
        18,
        2,
        1,
    )
    assert (report.loss_percent, report.time_ms, report.rtt_max_ms) == (10.0, 41, 0.051)
    with pytest.raises(netcheck.PingError, match="ping printed no statistics"):
        netcheck.parse_ping("PING 192.0.2.2 (192.0.2.2) 56(84) bytes of data.\n")
