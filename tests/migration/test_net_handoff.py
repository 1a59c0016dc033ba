"""A network device across a hand-off between real VMM processes in a network namespace the
test creates: the tap's fd travels (DEVICE_FDS), the new VMM adopts it (the tap stays
attached throughout, nobody opens it by name), and the device keeps its id and MAC. The
counter guest has no network driver, so its frames wait in the tap; the frame-level rules
(nothing read in the pause, everything read after) are tested in one process in
tests/vmm/test_virtio_net.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PATIENCE, VmmProcess, needs_kvm, wait_until
from tapkit import GUEST_IP, NetNs

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.devices.virtio.tap import Tap, TapError

pytestmark = needs_kvm


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.delete()


def test_the_tap_travels_to_the_new_vmm(netns: NetNs, tmp_path: Path) -> None:
    api, api2, mig = tmp_path / "api.sock", tmp_path / "api2.sock", tmp_path / "mig.sock"
    prefix = ["ip", "netns", "exec", netns.name]
    source = VmmProcess(
        ["run", "--guest", "counter", "--serial", "none", "--api-socket", str(api),
         "--net", "tap=tap0,id=lan", "--memory", "64M"],
        tmp_path, "source", prefix=prefix,
    )  # fmt: skip
    dest: VmmProcess | None = None
    try:
        wait_until(api.exists, "the source's control socket", proc=source)
        with QmpClient(str(api)) as qmp:
            (before,) = qmp.execute("query-net")
        netns.wait_carrier()
        dest = VmmProcess(
            ["run", "--incoming", f"unix:{mig}", "--api-socket", str(api2), "--serial", "none",
             "--net", "tap=tap0,id=lan"],
            tmp_path, "dest", prefix=prefix,
        )  # fmt: skip
        wait_until(mig.exists, "the destination's migration socket", proc=dest)
        sock = netns.udp()
        for i in range(20):
            sock.sendto(b"%d" % i, (GUEST_IP, 7))
        result = subprocess.run(
            [sys.executable, "-m", "intrahost", "migrate", "--api-socket", str(api), f"unix:{mig}"],
            capture_output=True,
            text=True,
            timeout=2 * PATIENCE,
        )
        assert result.returncode == 0, result.stderr + dest.output()
        assert source.wait() == 0, source.output()
        with QmpClient(str(api2)) as qmp:
            (after,) = qmp.execute("query-net")
            assert qmp.execute("query-status")["status"] == "running"
        for key in ("id", "ifname", "mac", "rx-packets", "tx-packets", "tx-errors"):
            assert after[key] == before[key], key
        # The new VMM holds the very tap: it is attached (carrier up) and busy.
        assert netns.link()["operstate"] == "UP"
        with pytest.raises(TapError, match="in use"):
            netns.inside(lambda: Tap.open("tap0"))
        sock.sendto(b"after", (GUEST_IP, 7))
        sock.close()
        assert "DEVICE_NEEDS_RESET" not in dest.output()
    finally:
        source.kill()
        if dest is not None:
            dest.kill()


def test_a_new_vmm_naming_another_mac_is_refused(netns: NetNs, tmp_path: Path) -> None:
    api, mig = tmp_path / "api.sock", tmp_path / "mig.sock"
    prefix = ["ip", "netns", "exec", netns.name]
    source = VmmProcess(
        ["run", "--guest", "counter", "--serial", "none", "--api-socket", str(api),
         "--net", "tap=tap0,mac=02:00:00:00:00:aa", "--memory", "64M"],
        tmp_path, "source", prefix=prefix,
    )  # fmt: skip
    dest = VmmProcess(
        ["run", "--incoming", f"unix:{mig}", "--serial", "none",
         "--net", "tap=tap0,mac=02:00:00:00:00:bb"],
        tmp_path, "dest", prefix=prefix,
    )  # fmt: skip
    try:
        wait_until(api.exists, "the source's control socket", proc=source)
        wait_until(mig.exists, "the destination's migration socket", proc=dest)
        result = subprocess.run(
            [sys.executable, "-m", "intrahost", "migrate", "--api-socket", str(api), f"unix:{mig}"],
            capture_output=True,
            text=True,
            timeout=2 * PATIENCE,
        )
        assert result.returncode != 0
        assert "--net must match the running guest" in result.stderr + dest.output()
        with QmpClient(str(api)) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
            (net,) = qmp.execute("query-net")
            assert net["mac"] == "02:00:00:00:00:aa"
    finally:
        source.kill()
        dest.kill()
