"""``make demo``: a counting guest handed to a new VMM process three times while it counts.

Starts the counter guest in a VMM process, shows its console and ``query-vm``, runs
``intrahost upgrade`` three times, prints each hand-off's blackout (as the VMM measured it and
as the guest saw it), and checks from outside — through the guest's memory — that the
counters never went back and the memory checksums still verify.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
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


if __name__ == "__main__":
    sys.exit(main())
