"""``make demo``: a counting guest, then a disk-writing guest, each handed to a new VMM
process three times while it runs.

Starts the counter guest in a VMM process, shows its console and ``query-vm``, runs
``intrahost upgrade`` three times, prints each hand-off's blackout (as the VMM measured it and
as the guest saw it), and checks from outside — through the guest's memory — that the
counters never went back and the memory checksums still verify.

Then the disk guest writes and verifies 4 KiB blocks on a raw image through virtio-blk while
it is upgraded three times (the image fd and the device's eventfds travel to each new VMM);
each hand-off's I/O blackout — the longest time no request completed, as the guest saw it —
is shown next to its vCPU blackout, and at the end ``intrahost guest-check disk`` verifies
that every write the guest saw complete is on the image.

Last, the net guest answers ping and UDP echo on a tap in a network namespace of the demo's
own (``intrahost-demo-PID-N``: the host is 192.0.2.1 on ``tap0``, the guest 192.0.2.2; no
traffic leaves it) while it is upgraded three times (the tap's fd travels to each new VMM).
``ping -i 0.002`` and a UDP echo stream (2000 datagrams/s) run throughout; their reports must
show nothing lost and nothing duplicated, or the demo fails. ping is given a count, not
stopped with SIGINT: ping then waits for its last replies, where SIGINT would count the
probes still in flight as lost. The namespace, and every process in it, is removed at the
end, also on Ctrl-C. Where it can't run (not root, no ``ip`` or ``ping``, no
``/dev/net/tun``), the demo says so in one line and skips this part.

``python -m intrahost.demo [counter] [disk] [net]`` runs only the parts named.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.netcheck import EchoStream, NetNamespace, Ping, PingReport

VCPUS = 2
UPGRADES = 3


def _intrahost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args], capture_output=True, text=True, check=False
    )


def _counters(mem: mmap.mmap) -> list[int]:
    return [layout.read_slot(mem, i).counter for i in range(VCPUS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m intrahost.demo",
        description="Run guests and hand each to a new VMM process three times while it "
        "runs: the counter guest, the disk guest, the net guest (default: all three).",
    )
    parser.add_argument("parts", nargs="*", metavar="PART", help="counter, disk or net")
    parts = parser.parse_args(argv).parts or list(PARTS)
    for part in parts:  # (not choices=: argparse refuses an empty list against them)
        if part not in PARTS:
            parser.error(f"no part {part!r}: choose from counter, disk, net")
    code = 0
    for i, part in enumerate(p for p in PARTS if p in parts):
        if i:
            print()
        code = PARTS[part]()
        if code:
            break
    return code


def _wait(
    vmm: subprocess.Popen[Any], done: Callable[[], bool], failure: str, deadline: float
) -> bool:
    """Poll ``done()`` until it holds: True. False, after printing ``failure``, once ``vmm``
    has exited or the time passed ``deadline`` (``time.monotonic()``)."""
    while not done():
        if vmm.poll() is not None or time.monotonic() > deadline:
            print(failure, file=sys.stderr)
            return False
        time.sleep(0.02)
    return True


def counter_demo() -> int:
    work = Path(tempfile.mkdtemp(prefix="intrahost-demo-"))
    ram = Path(f"/dev/shm/intrahost-demo-{uuid.uuid4().hex[:8]}")
    api = work / "api.sock"
    serial = work / "serial.log"
    vmm = subprocess.Popen(
        [
            sys.executable, "-m", "intrahost", "run",
            "--memory", "256M", "--vcpus", str(VCPUS),
            "--guest", "counter", "--guest-args", "progress=67108864",
            "--memory-path", str(ram), "--serial", f"file:{serial}",
            "--api-socket", str(api),
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        if not _wait(vmm, api.exists, "the VMM did not start", time.monotonic() + 30):
            return 1
        fd = os.open(ram, os.O_RDONLY)
        mem = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        print(f"== the counter guest runs on {VCPUS} vCPUs in VMM pid {vmm.pid}")
        time.sleep(2.0)
        print("== its console so far:")
        print("   " + "\n   ".join(serial.read_text().splitlines()[-4:]))
        with QmpClient(api) as qmp:
            info = qmp.execute("query-vm")
        print("== query-vm:")
        print("   " + json.dumps(info))

        rows = []
        for i in range(UPGRADES):
            before = _counters(mem)
            t0 = time.monotonic()
            result = _intrahost("upgrade", "--api-socket", str(api))
            wall = time.monotonic() - t0
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 1
            with QmpClient(api) as qmp:
                pid = qmp.execute("query-vm")["pid"]
            time.sleep(0.5)
            after = _counters(mem)
            assert all(b > a for a, b in zip(before, after, strict=True)), "counter stopped"
            line = result.stdout.splitlines()[0]
            rows.append((i + 1, pid, line, wall))
            print(f"== upgrade {i + 1}: now VMM pid {pid} ({wall:.2f} s end to end)")

        print()
        print(f"{'#':>2} {'new pid':>8}  blackout (VMM-measured) and guest-observed pause")
        for n, pid, line, _ in rows:
            print(f"{n:>2} {pid:>8}  {line.removeprefix('blackout: ')}")

        with QmpClient(api) as qmp:
            qmp.execute("stop")
            final = _counters(mem)
            for vcpu in range(VCPUS):
                layout.verify_region(mem, vcpu)
            qmp.execute("quit")
        print()
        print(f"== counters now {final}: still rising after each of {UPGRADES} new VMMs took over;")
        print("== every vCPU's 64 KiB memory region matches its counter and checksum.")
        print("== the guest's console (one file, continued by each VMM):")
        print("   " + "\n   ".join(serial.read_text().splitlines()[-4:]))
        mem.close()
        return 0
    finally:
        if vmm.poll() is None:
            vmm.terminate()
        # upgrade detaches each new VMM: end whichever one serves the socket now
        _end_served(api)
        ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _end_served(api: Path) -> None:
    """SIGTERM the VMM that serves ``api``, if one still does."""
    try:
        with QmpClient(api, timeout=5) as qmp:
            pid = qmp.execute("query-vm")["pid"]
    except (OSError, IntrahostError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def disk_demo() -> int:
    from intrahost.vmm.guests.probe import DiskProbe, host_tsc_khz

    work = Path(tempfile.mkdtemp(prefix="intrahost-demo-disk-"))
    ram = Path(f"/dev/shm/intrahost-demo-disk-{uuid.uuid4().hex[:8]}")
    api = work / "api.sock"
    image = work / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    vmm = subprocess.Popen(
        [
            sys.executable, "-m", "intrahost", "run",
            "--memory", "64M", "--guest", "disk", "--guest-args", "progress=1000000000",
            "--disk", f"path={image}", "--memory-path", str(ram), "--serial", "none",
            "--api-socket", str(api),
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    pid = vmm.pid
    try:
        deadline = time.monotonic() + 30
        if not _wait(vmm, lambda: api.exists() and ram.exists(), "the VMM did not start", deadline):
            return 1
        fd = os.open(ram, os.O_RDWR)
        mem = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        os.close(fd)
        probe = DiskProbe(mem)
        khz = host_tsc_khz()

        def writes() -> int:
            status = probe.status()
            return status.writes_completed if status is not None else 0

        if not _wait(
            vmm, lambda: writes() >= 1000, "the disk guest did not start writing", deadline
        ):
            return 1
        print(f"== the disk guest writes 4 KiB blocks to {image} in VMM pid {pid}")
        rows = []
        for i in range(UPGRADES):
            before = writes()
            probe.reset_gaps()
            result = _intrahost("upgrade", "--api-socket", str(api))
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 1
            with QmpClient(api) as qmp:
                pid = qmp.execute("query-vm")["pid"]
            deadline = time.monotonic() + 30
            while writes() < before + 1000:
                if time.monotonic() > deadline:
                    print("the disk guest stopped writing", file=sys.stderr)
                    return 1
                time.sleep(0.02)
            io_us, vcpu_us = probe.gaps_us(khz)
            rows.append((i + 1, pid, writes() - before, io_us, vcpu_us))
            print(f"== upgrade {i + 1}: now VMM pid {pid}; the guest goes on writing")
        print()
        header = f"{'#':>2} {'new pid':>8} {'writes since':>12}  I/O blackout"
        print(header + "   vCPU blackout (both as the guest saw them)")
        for n, new_pid, done, io_us, vcpu_us in rows:
            print(f"{n:>2} {new_pid:>8} {done:>12}  {io_us:>9.0f} µs  {vcpu_us:>9.0f} µs")
        with QmpClient(api) as qmp:
            qmp.execute("stop")
            (disk,) = qmp.execute("query-block")
            status = probe.status()
            assert status is not None
            check = _intrahost("guest-check", "disk", str(image), "--status-from", str(ram))
            qmp.execute("quit")
        stats = disk["stats"]
        print()
        print(
            f"== the guest saw {status.writes_completed} writes and {status.reads_completed} "
            f"verified reads complete ({status.verify_failures} verify failures, "
            f"{status.duplicates} duplicate completions); the device counted "
            f"{stats['wr_operations']} writes and {stats['rd_operations']} reads over the "
            "guest's whole life, across the VMMs"
        )
        print("== intrahost guest-check disk (the image against the guest's memory):")
        print("   " + "\n   ".join(check.stdout.splitlines()[-3:]))
        mem.close()
        return 0 if check.returncode == 0 and not status.verify_failures else 1
    finally:
        if vmm.poll() is None:
            vmm.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the VMM that serves the guest now, if still there
        ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


# --- the net guest ------------------------------------------------------------------------------

GUEST_IP = "192.0.2.2"
#: ping's probes, 2 ms apart (at most 500 a second; fewer on a busy host): enough to outlast
#: three upgrades. ping sends them all and then waits for the last replies.
PING_COUNT = 2500
STREAM_RATE = 2000.0


def net_unavailable() -> str | None:
    """Why this machine can't run the net part, or None."""
    if os.geteuid() != 0:
        return "it needs root (a network namespace and a tap)"
    for tool, package in (("ip", "iproute2"), ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed ({package})"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "there is no usable /dev/net/tun"
    return None


def net_demo() -> int:
    reason = net_unavailable()
    if reason is not None:
        print(f"== skipping the network part of the demo: {reason}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="intrahost-demo-net-"))
    api = work / "api.sock"
    netns = NetNamespace("tap0", prefix="intrahost-demo")
    try:
        try:
            netns.create()
        except IntrahostError as error:
            print(f"the network part failed: {error}", file=sys.stderr)
            return 1
        vmm = netns.popen(
            [
                sys.executable, "-m", "intrahost", "run",
                "--memory", "64M", "--guest", "net", "--guest-args", f"ip={GUEST_IP}/24",
                "--net", "tap=tap0,id=lan", "--serial", "none", "--api-socket", str(api),
            ],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if not _wait(vmm, api.exists, "the VMM did not start", time.monotonic() + 30):
                return 1
            with EchoStream(netns, GUEST_IP, rate=STREAM_RATE) as stream:
                stream.wait_replies(100)  # the guest answers (and ARP is resolved)
                with Ping(netns, GUEST_IP, interval=0.002, count=PING_COUNT) as ping:
                    return _net_upgrades(netns, api, vmm.pid, stream, ping)
        except IntrahostError as error:  # the namespace, the stream or ping failed
            print(f"the network part failed: {error}", file=sys.stderr)
            return 1
        finally:
            vmm.kill()
            vmm.wait()
    finally:
        # The upgrades' VMMs are not this process's children: end every process in the
        # namespace by its pid, then delete the namespace (and so its tap).
        if netns.exists():
            _end_processes(netns.name)
        netns.remove()
        shutil.rmtree(work, ignore_errors=True)


def _net_upgrades(netns: NetNamespace, api: Path, pid: int, stream: EchoStream, ping: Ping) -> int:
    print(
        f"== the net guest ({GUEST_IP}) runs in VMM pid {pid}, on tap0 in the network "
        f"namespace {netns.name} (the host is 192.0.2.1 there)"
    )
    print(
        f"== ping -i 0.002 -c {PING_COUNT} and a UDP echo stream ({STREAM_RATE:.0f} "
        "datagrams/s to port 7) run while it is upgraded"
    )
    rows = []
    for i in range(UPGRADES):
        result = netns.run(
            [sys.executable, "-m", "intrahost", "upgrade", "--api-socket", str(api)],
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        with QmpClient(api) as qmp:
            pid = qmp.execute("query-vm")["pid"]
        # The guest answers through the new VMM before the next upgrade.
        progress = stream.progress()
        stream.wait_replies((progress["received"] if progress else 0) + 200)
        rows.append((i + 1, pid, result.stdout.splitlines()[0]))
        print(f"== upgrade {i + 1}: now VMM pid {pid}; the guest goes on answering")
    ping_running = ping.proc is not None and ping.proc.poll() is None
    pinged = ping.report(timeout=120)  # ping ends once its last probe is answered
    stream.stop()
    echoed = stream.report()
    with QmpClient(api) as qmp:
        (net,) = qmp.execute("query-net")
        qmp.execute("quit")
    print()
    print(f"{'#':>2} {'new pid':>8}  blackout (VMM-measured)")
    for n, new_pid, line in rows:
        print(f"{n:>2} {new_pid:>8}  {line.removeprefix('blackout: ')}")
    print()
    print("== ping:")
    print("   " + "\n   ".join(_ping_summary(pinged)))
    print("== the UDP echo stream:")
    print("   " + "\n   ".join(echoed.summary().splitlines()))
    print(
        f"== the device counted {net['rx-packets']} frames in and {net['tx-packets']} out "
        f"({net['rx-dropped']} dropped, {net['tx-errors']} transmit errors) over the guest's "
        "whole life, across the VMMs"
    )
    problems = []
    if not ping_running:
        problems.append(
            f"ping's {PING_COUNT} probes were all answered before the third upgrade ended"
        )
    if pinged.lost or pinged.duplicates or pinged.errors:
        problems.append(
            f"ping: {pinged.lost} lost, {pinged.duplicates} duplicated, {pinged.errors} errors"
        )
    if echoed.lost or echoed.duplicated or echoed.send_errors or echoed.socket_drops:
        problems.append(
            f"UDP echo: {echoed.lost} lost, {echoed.duplicated} duplicated, "
            f"{echoed.send_errors} send errors, {echoed.socket_drops} dropped by the socket"
        )
    if problems:
        print(f"FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print("OK: 0% loss through three upgrades")
    return 0


def _ping_summary(report: PingReport) -> list[str]:
    """ping's own closing statistics, from its parsed report."""
    line = f"{report.transmitted} packets transmitted, {report.received} received"
    if report.duplicates:
        line += f", +{report.duplicates} duplicates"
    if report.errors:
        line += f", +{report.errors} errors"
    line += f", {report.loss_percent:g}% packet loss"
    if report.time_ms is not None:
        line += f", time {report.time_ms}ms"
    if report.rtt_avg_ms is None:
        return [line]
    rtt = (report.rtt_min_ms, report.rtt_avg_ms, report.rtt_max_ms, report.rtt_mdev_ms)
    return [
        line,
        "rtt min/avg/max/mdev = " + "/".join(f"{v:.3f}" for v in rtt if v is not None) + " ms",
    ]


def _end_processes(netns: str) -> None:
    """End every process in the namespace by its pid: SIGTERM, then SIGKILL after 5 s. Looks
    again until the namespace is empty (an upgrade interrupted by Ctrl-C may have started a
    new VMM meanwhile), for at most 15 s."""
    give_up = time.monotonic() + 15
    while time.monotonic() < give_up:
        listed = subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
        ).stdout.split()
        alive = [int(p) for p in listed if p.isdigit() and int(p) != os.getpid()]
        if not alive:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while alive and time.monotonic() < deadline:
                time.sleep(0.02)
                alive = [pid for pid in alive if _running(pid)]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


PARTS = {"counter": counter_demo, "disk": disk_demo, "net": net_demo}

if __name__ == "__main__":
    sys.exit(main())
