"""Block I/O through intrahost's virtio-blk, and the I/O blackout of a hand-off.

For each point (random 4 KiB writes or reads x queue depth) the built-in disk guest runs in
its bench mode (``bench=1`` random writes, ``bench=2`` random reads, ``inflight=QD``; a CPL3
driver that polls the used ring and batches its kicks, so the device is what is measured) on a
page-cached image under ``intrahost run``, and is handed to a new VMM process ``-n`` times:

- **IOPS** before and after the hand-offs: completions counted by the guest (its status page,
  read through the memory file) over ``--seconds`` windows, and the VMM process's CPU time per
  request over the same window (``/proc/PID/stat``: where the time goes);
- per hand-off, the **I/O blackout** — the longest time no request completed, as the guest
  saw it (its largest gap between two reaps that found completions, reset right before
  ``migrate``) — next to the **vCPU blackout** (the guest's largest gap between two turns of
  its loop, and the VMM's own breakdown: total, and the drain: the devices' share of the pause);
- the **noise floor**: the same two gaps over a window as long, without a hand-off.

    python bench/io.py                         # 4 points, 3 hand-offs each: ~1-2 minutes
    python bench/io.py --points randwrite:16 --handoffs 10 --seconds 5

Writes bench/out/io.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import BenchError, Workspace, exit_on_sigterm, wait_until

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.probe import DiskProbe, host_tsc_khz

HERE = Path(__file__).resolve().parent
MODES = {"randwrite": layout.DISK_BENCH_RANDWRITE, "randread": layout.DISK_BENCH_RANDREAD}
IMAGE_SIZE = 256 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of process ``pid``: (CPU seconds, of which in the guest) so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the name: state is field 0, utime 11, stime 12, guest_time 40.
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out[int(task.name)] = (cpu, int(fields[40]) / CLK_TCK)
    return out


class Guest:
    """The disk guest's status page through its memory file."""

    def __init__(self, path: Path, counter: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, layout.DISK_STATUS_ADDR + layout.DISK_STATUS_SIZE)
        finally:
            os.close(fd)
        self.probe = DiskProbe(self.map)
        self.counter = counter

    def done(self) -> int:
        status = self.probe.status()
        return 0 if status is None else int(getattr(status, self.counter))

    def close(self) -> None:
        self.map.close()


def measure_iops(guest: Guest, pid: int, seconds: float) -> dict[str, float]:
    """IOPS over ``seconds``, and where the VMM's CPU time went: the vCPU thread (the one
    that spent time in the guest: the CPL3 driver polls, so it is busy whatever the rate) and
    the device's I/O thread (the busiest of the others: the request path in Python)."""
    c0, cpu0, t0 = guest.done(), thread_cpu(pid), time.monotonic()
    time.sleep(seconds)
    c1, cpu1, t1 = guest.done(), thread_cpu(pid), time.monotonic()
    elapsed = t1 - t0
    requests = max(1, c1 - c0)
    used = {t: (cpu1[t][0] - cpu0[t][0], cpu1[t][1] - cpu0[t][1]) for t in cpu1 if t in cpu0}
    vcpu = max(used, key=lambda t: used[t][1])
    device = max((t for t in used if t != vcpu), key=lambda t: used[t][0])
    return {
        "iops": round((c1 - c0) / elapsed),
        "device_thread_cpu_share": round(used[device][0] / elapsed, 2),
        "device_thread_us_per_request": round(used[device][0] * 1e6 / requests, 1),
        "vcpu_thread_cpu_share": round(used[vcpu][0] / elapsed, 2),
        "host_load": round(os.getloadavg()[0], 1),
    }


def run_point(
    ws: Workspace, image: Path, mode: str, depth: int, handoffs: int, seconds: float, khz: int
) -> dict[str, Any]:
    tag = f"{mode}-{depth}"
    shm = ws.shm_file(tag)
    api = ws.path(f"{tag}-0.sock")
    counter = "writes_completed" if mode == "randwrite" else "reads_completed"
    args = f"bench={MODES[mode]} inflight={depth} progress=1000000000"
    vmm = ws.spawn(
        [
            sys.executable, "-m", "intrahost", "run", "--memory", "64M", "--guest", "disk",
            "--guest-args", args, "--disk", f"path={image}", "--memory-path", str(shm),
            "--serial", "none", "--api-socket", str(api),
        ],
        f"{tag}-0",
    )  # fmt: skip
    wait_until(shm.exists, 30, "the guest's memory file", vmm)
    guest = Guest(shm, counter)
    try:
        wait_until(lambda: guest.done() > 1000, 60, f"{tag}: the guest's first requests", vmm)
        time.sleep(0.5)  # warm-up
        before = measure_iops(guest, vmm.pid, seconds)
        # The noise floor: the gaps over a window without a hand-off.
        guest.probe.reset_gaps()
        time.sleep(1.0)
        floor_io, floor_cpu = guest.probe.gaps_us(khz)
        rows = []
        current, pid = api, vmm.pid
        for i in range(handoffs):
            mig = ws.path(f"{tag}-m{i + 1}.sock")
            new_api = ws.path(f"{tag}-{i + 1}.sock")
            dest = ws.spawn(
                [
                    sys.executable, "-m", "intrahost", "run", "--incoming", f"unix:{mig}",
                    "--serial", "none", "--api-socket", str(new_api),
                ],
                f"{tag}-{i + 1}",
            )  # fmt: skip
            wait_until(mig.exists, 30, "the new VMM to listen", dest)
            start = guest.done()
            with QmpClient(current) as qmp:
                guest.probe.reset_gaps()
                qmp.execute("migrate", uri=f"unix:{mig}")
                while (result := qmp.execute("query-migrate"))["status"] == "active":
                    time.sleep(0.01)
            if result["status"] != "completed":
                raise BenchError(f"{tag}: hand-off {i + 1} failed: {result.get('error-desc')}")
            # Read the gaps once the guest completed requests on the new VMM for a while.
            wait_until(lambda s=start: guest.done() > s + 2000, 60, "requests after the hand-off")
            io_gap, loop_gap = guest.probe.gaps_us(khz)
            blackout = result["blackout"]
            rows.append(
                {
                    "io_blackout_us": io_gap,
                    "guest_vcpu_blackout_us": loop_gap,
                    "vmm_total_us": blackout["total_us"],
                    "vmm_pause_us": blackout["pause_us"],
                    "drain_us": blackout.get("drain_us", 0),
                }
            )
            current, pid = new_api, dest.pid
        time.sleep(0.5)
        after = measure_iops(guest, pid, seconds)
        with QmpClient(current) as qmp:
            stats = qmp.execute("query-block")[0]["stats"]
            qmp.execute("quit")
        status = guest.probe.status()
        assert status is not None
        if status.duplicates or status.io_errors:
            raise BenchError(f"{tag}: {status.duplicates} duplicates, {status.io_errors} errors")
        ratios = [r["io_blackout_us"] / max(1.0, r["guest_vcpu_blackout_us"]) for r in rows]
        return {
            "mode": mode,
            "queue_depth": depth,
            "before": before,
            "after": after,
            "handoffs": rows,
            "median": {key: statistics.median(r[key] for r in rows) for key in rows[0] if rows},
            "io_over_vcpu_blackout_median": round(statistics.median(ratios), 2),
            "floor": {"io_gap_us": floor_io, "loop_gap_us": floor_cpu},
            "device_counters": stats,
        }
    finally:
        guest.close()


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--points",
        default="randwrite:1,randwrite:16,randread:1,randread:16",
        help="MODE:QD,... (MODE randwrite or randread)",
    )
    parser.add_argument("--handoffs", "-n", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="each IOPS window")
    parser.add_argument("--out", default=str(HERE / "out" / "io.json"))
    args = parser.parse_args()
    points = []
    for item in args.points.split(","):
        mode, _, depth = item.partition(":")
        if mode not in MODES or not depth.isdigit() or not 1 <= int(depth) <= 85:
            parser.error(f"bad point {item!r}: use randwrite:QD or randread:QD (QD 1-85)")
        points.append((mode, int(depth)))
    khz = host_tsc_khz()
    results = []
    with Workspace("io") as ws:
        image = ws.path("disk.img")
        # Data in every block, and all of it in the page cache.
        chunk = bytes(range(256)) * 4096
        with image.open("wb") as f:
            for _ in range(IMAGE_SIZE // len(chunk)):
                f.write(chunk)
        for mode, depth in points:
            result = run_point(ws, image, mode, depth, args.handoffs, args.seconds, khz)
            results.append(result)
            m, b, a = result["median"], result["before"], result["after"]
            print(
                f"{mode:<9} qd{depth:<3} IOPS before {b['iops']:>6} after {a['iops']:>6} "
                f"(device thread {b['device_thread_us_per_request']} µs/request at "
                f"{b['device_thread_cpu_share']} CPU, vCPU {b['vcpu_thread_cpu_share']} CPU, "
                f"load {b['host_load']}) | median of {args.handoffs}: I/O blackout "
                f"{m['io_blackout_us']:.0f} µs, vCPU blackout {m['guest_vcpu_blackout_us']:.0f} "
                f"µs (VMM total {m['vmm_total_us']:.0f}, drain {m['drain_us']:.0f}), "
                f"ratio {result['io_over_vcpu_blackout_median']} | floor: I/O gap "
                f"{result['floor']['io_gap_us']:.0f} µs, loop gap "
                f"{result['floor']['loop_gap_us']:.0f} µs",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = {
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "tsc_khz": khz,
    }
    out.write_text(json.dumps({"host": host, "points": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
