"""Taps and --net: opening by name and adopting an fd (real taps in a namespace the test
creates), the one-line errors, --net parsing, the machine's nets (real /dev/kvm), and a VMM
process with a tap answering query-net."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import PATIENCE, VmmProcess, needs_kvm, wait_until
from tapkit import GUEST_IP, NetNs
from tapkit import tap_netns as tap_netns  # the netns fixture

from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.config import (
    MachineConfig,
    MachineConfigError,
    NetConfig,
    parse_disk,
    parse_net,
)
from intrahost.vmm.devices.virtio.tap import IFF_NO_PI, IFF_TAP, Tap, TapError, describe_fd

# --- Tap -------------------------------------------------------------------------------------


def test_open_by_name_attaches_to_the_persistent_tap(netns: NetNs) -> None:
    tap = netns.open_tap()
    try:
        assert tap.ifname == "tap0"
        assert fcntl.fcntl(tap.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        name, flags = describe_fd(tap.fd, "tap")
        assert name == "tap0" and flags & IFF_TAP and flags & IFF_NO_PI
        with pytest.raises(BlockingIOError):
            os.read(tap.fd, 2000)  # nothing queued; the device relies on EAGAIN
    finally:
        tap.close()


def test_a_name_held_by_another_fd_is_busy(netns: NetNs) -> None:
    tap = netns.open_tap()
    try:
        with pytest.raises(TapError, match="tap tap0 is in use by another process"):
            netns.inside(lambda: Tap.open("tap0"))
    finally:
        tap.close()


def test_a_missing_name_makes_a_tap_that_lives_with_the_fd(netns: NetNs) -> None:
    tap = netns.inside(lambda: Tap.open("fresh0"))
    assert "fresh0" in netns.exec("ip", "link", "show")
    tap.close()
    wait_until(
        lambda: "fresh0" not in netns.exec("ip", "link", "show"), "the non-persistent tap gone"
    )


def test_adopting_an_fd_checks_it(netns: NetNs, tmp_path: Path) -> None:
    fd = netns.tun_fd()
    tap = Tap.from_fd(fd)
    try:
        assert tap.ifname == "tap0"
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not os.get_inheritable(fd)
    finally:
        tap.close()
    with (
        open(tmp_path / "file", "w") as f,
        pytest.raises(TapError, match=r"fd \d+ is not a tap device"),
    ):
        Tap.from_fd(f.fileno())
    unattached = os.open("/dev/net/tun", os.O_RDWR)
    try:
        with pytest.raises(TapError, match="not attached to any interface"):
            Tap.from_fd(unattached)
    finally:
        os.close(unattached)
    with pytest.raises(TapError, match="is not an open file descriptor"):
        Tap.from_fd(987)
    r, w = os.pipe()
    try:
        with pytest.raises(TapError, match="is not a tap device"):
            Tap.from_fd(r)
    finally:
        os.close(r)
        os.close(w)


def test_bad_names_are_refused() -> None:
    for name in ("", "a" * 16, "a/b"):
        with pytest.raises(TapError, match="tap name"):
            Tap.open(name)


# --- --net -----------------------------------------------------------------------------------


def test_parse_net() -> None:
    assert parse_net("tap=tap0") == NetConfig(tap="tap0", id="net0")
    assert parse_net("fd=5,mac=02:AA:bb:00:00:01,id=lan", 3) == NetConfig(
        fd=5, mac="02:aa:bb:00:00:01", id="lan"
    )
    assert parse_net("tap=t1", 2).id == "net2"
    for text, message in [
        ("tap=a,fd=3", "give one of tap=NAME or fd=N"),
        ("mac=02:00:00:00:00:01", "give one of tap=NAME or fd=N"),
        ("tap=a,tap=b", "tap is given twice"),
        ("tap=a,speed=10", "unknown key 'speed'"),
        ("fd=x", "fd must be a file descriptor number"),
        ("tap", "is not KEY=VALUE"),
        ("tap=", "tap= needs a name"),
        ("tap=a,mac=01:00:00:00:00:01", "multicast"),
        ("tap=a,mac=02:00:00:00:01", "six colon-separated hex bytes"),
        ("tap=a,mac=zz:00:00:00:00:01", "six colon-separated hex bytes"),
        ("tap=a,id=bad id", "--net id"),
    ]:
        with pytest.raises(MachineConfigError, match=message):
            parse_net(text)


def test_config_nets_json_and_guest_view() -> None:
    config = MachineConfig(nets=(NetConfig(tap="t", id="net0").with_mac(),))
    mac = config.nets[0].mac
    assert mac and int(mac[:2], 16) & 3 == 2  # locally administered, unicast
    again = MachineConfig.from_dict(config.to_dict())
    assert again == config
    assert config.nets[0].with_mac() == config.nets[0]  # chosen once
    assert not again.guest_differences(config)
    other = MachineConfig(nets=(NetConfig(tap="t", id="net0").with_mac(),))
    assert config.guest_differences(other) == ["nets"]
    # A new VMM's --net flag: the same id matches; a MAC, if given, must be the guest's.
    assert not config.flag_differs("nets", (NetConfig(tap="other", id="net0"),))
    assert not config.flag_differs("nets", (NetConfig(tap="t", id="net0", mac=mac),))
    assert config.flag_differs("nets", (NetConfig(tap="t", id="net0", mac="02:00:00:00:00:09"),))
    assert config.flag_differs("nets", ())
    with pytest.raises(MachineConfigError, match="--net ids must differ"):
        MachineConfig(nets=(NetConfig(tap="a", id="x"), NetConfig(tap="b", id="x")))
    with pytest.raises(MachineConfigError, match="at most 16 virtio devices"):
        MachineConfig(nets=tuple(NetConfig(tap=f"t{i}", id=f"n{i}") for i in range(17)))


def test_the_cmdline_lists_disks_then_nets() -> None:
    from intrahost.vmm.config import DiskConfig

    config = MachineConfig(
        disks=(DiskConfig(path="/x", id="d0"),),
        nets=(NetConfig(tap="a", id="n0"), NetConfig(tap="b", id="n1")),
    )
    assert config.cmdline.split()[1:] == [
        "virtio_mmio.device=4K@0xd0000000:5",
        "virtio_mmio.device=4K@0xd0001000:6",
        "virtio_mmio.device=4K@0xd0002000:7",
    ]


# --- the machine and a VMM process -------------------------------------------------------------


@needs_kvm
def test_machine_builds_nets_after_disks(netns: NetNs, tmp_path: Path) -> None:
    from intrahost.vmm.machine import Machine

    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    fd = netns.tun_fd()
    config = MachineConfig(
        memory=32 << 20,
        guest="hello",
        disks=(parse_disk(f"path={image}"),),
        nets=(parse_net(f"fd={fd}"), parse_net("tap=extra0", 1)),
    )
    machine = netns.inside(lambda: Machine.create(config))
    try:
        kinds = [d.backend.device_id for d in machine.virtio]
        assert kinds == [2, 1, 1]
        assert [d.base for d in machine.virtio] == [0xD000_0000, 0xD000_1000, 0xD000_2000]
        nets = machine.query_net()
        assert [n["id"] for n in nets] == ["net0", "net1"]
        assert [n["ifname"] for n in nets] == ["tap0", "extra0"]
        assert [n["mac"] for n in nets] == [n.mac for n in machine.config.nets]
        assert all(n.mac for n in machine.config.nets)
        assert machine.query()["nets"] == 2 and machine.query()["disks"] == 1
    finally:
        machine.close()


@needs_kvm
def test_a_busy_tap_fails_the_start_in_one_line(netns: NetNs, tmp_path: Path) -> None:
    holder = netns.open_tap()
    try:
        proc = subprocess.run(
            [
                *("ip", "netns", "exec", netns.name, sys.executable, "-m", "intrahost", "run"),
                *("--guest", "hello", "--serial", "none", "--net", "tap=tap0"),
            ],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
    finally:
        holder.close()
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and "tap tap0 is in use by another process" in lines[-1]
    assert "Traceback" not in proc.stderr


@needs_kvm
def test_a_vmm_with_a_tap_answers_query_net(netns: NetNs, tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    vmm = VmmProcess(
        [
            *("run", "--guest", "counter", "--serial", "none", "--api-socket", str(api)),
            *("--net", "tap=tap0,id=lan"),
        ],
        tmp_path,
        prefix=["ip", "netns", "exec", netns.name],
    )
    try:
        wait_until(api.exists, "the control socket", proc=vmm)
        with QmpClient(str(api)) as qmp:
            (net,) = qmp.execute("query-net")
            assert net["id"] == "lan" and net["ifname"] == "tap0" and net["link"] == "up"
            assert net["mac"] and net["rx-packets"] == 0 and net["tx-errors"] == 0
            assert qmp.execute("query-vm")["nets"] == 1
        netns.wait_carrier()
        # The counter guest has no driver: frames to it wait in the tap; nothing breaks.
        sock = netns.udp()
        sock.sendto(b"x", (GUEST_IP, 7))
        sock.close()
        out = subprocess.run(
            [sys.executable, "-m", "intrahost", "status", "--api-socket", str(api)],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=True,
        ).stdout
        assert '"net"' in out and '"lan"' in out
    finally:
        vmm.kill(signal.SIGTERM)
