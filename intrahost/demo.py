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
"""

from __future__ import annotations

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
from pathlib import Path

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout

VCPUS = 2
UPGRADES = 3


def _intrahost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args], capture_output=True, text=True, check=False
    )


def _counters(mem: mmap.mmap) -> list[int]:
    return [layout.read_slot(mem, i).counter for i in range(VCPUS)]


def main() -> int:
    code = counter_demo()
    if code == 0:
        print()
        code = disk_demo()
    return code


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
        deadline = time.monotonic() + 30
        while not api.exists():
            if vmm.poll() is not None or time.monotonic() > deadline:
                print("the VMM did not start", file=sys.stderr)
                return 1
            time.sleep(0.02)
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
        subprocess.run(["pkill", "-f", f"intrahost run.*{api}"], check=False)
        ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


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
        while not (api.exists() and ram.exists()):
            if vmm.poll() is not None or time.monotonic() > deadline:
                print("the VMM did not start", file=sys.stderr)
                return 1
            time.sleep(0.02)
        fd = os.open(ram, os.O_RDWR)
        mem = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        os.close(fd)
        probe = DiskProbe(mem)
        khz = host_tsc_khz()

        def writes() -> int:
            status = probe.status()
            return status.writes_completed if status is not None else 0

        while writes() < 1000:
            if vmm.poll() is not None or time.monotonic() > deadline:
                print("the disk guest did not start writing", file=sys.stderr)
                return 1
            time.sleep(0.02)
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


if __name__ == "__main__":
    sys.exit(main())
