"""A hand-off whose pause cannot complete fails, and the guest keeps running on the source."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs_kvm

from intrahost.migration.receiver import ReceiveOptions
from intrahost.migration.sender import MigrationFailed, Sender, SendOptions
from intrahost.service.runner import listen, receive
from intrahost.vmm.devices import Console
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

pytestmark = needs_kvm


class StuckConsole(Console):
    """A console whose write blocks while it is held: the vCPU that prints is stuck in its
    exit handler (with the UART's lock), where no kick reaches it."""

    description = "stuck"

    def __init__(self) -> None:
        self._held = threading.Event()
        self._let_go = threading.Event()
        self.stuck = threading.Event()

    def write(self, data: bytes) -> int:
        if self._held.is_set() and not self._let_go.is_set():
            self.stuck.set()
            self._let_go.wait()
        return len(data)

    def hold(self) -> None:
        self._held.set()
        assert self.stuck.wait(10), "the guest printed nothing"

    def let_go(self) -> None:
        self._let_go.set()


@pytest.fixture
def source(sockdir: Path) -> Iterator[tuple[Machine, StuckConsole]]:
    config = MachineConfig(memory=32 * MiB, guest="counter", guest_args="progress=65536")
    machine = Machine.create(config)
    console = StuckConsole()
    machine.uart.console.close()
    machine.uart.console = console
    machine.start()
    try:
        yield machine, console
    finally:
        console.let_go()
        machine.close()


def _counter(machine: Machine) -> int:
    try:
        return layout.read_slot(machine.memory.buffer, 0).counter
    except layout.GuestStatusMissing:
        return 0


def _wait_counting_on(machine: Machine, timeout: float = 10.0) -> None:
    before = _counter(machine)
    deadline = time.monotonic() + timeout
    while _counter(machine) <= before:
        assert time.monotonic() < deadline, "the guest does not count on"
        time.sleep(0.01)


def _destination(url: str) -> tuple[threading.Thread, dict[str, object]]:
    """A destination in this process; ``box`` gets its machine or its error."""
    listener = listen(url)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["machine"] = receive(url, ReceiveOptions(timeout=10), 10, listener)
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=run, name="destination")
    thread.start()
    return thread, box


def test_a_pause_that_times_out_fails_the_handoff_and_the_guest_keeps_running(
    source: tuple[Machine, StuckConsole], sockdir: Path
) -> None:
    machine, console = source
    _wait_counting_on(machine)
    console.hold()
    url = f"unix:{sockdir / 'mig.sock'}"
    thread, box = _destination(url)
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match=r"at pause: vCPU 0 did not park.*keeps running here"):
        Sender(machine, url, SendOptions(pause_timeout=0.5)).run()
    assert time.monotonic() - t0 < 10
    thread.join(15)
    assert "machine" not in box, "the destination took the guest"
    assert machine.status == "running"
    console.let_go()
    assert not machine.uart.paused  # (its lock was the stuck vCPU's until now)
    _wait_counting_on(machine)
    # Nothing is left half-paused: the next hand-off goes through.
    url = f"unix:{sockdir / 'mig2.sock'}"
    thread, box = _destination(url)
    Sender(machine, url).run()
    thread.join(15)
    dest = box.get("machine")
    assert isinstance(dest, Machine), box
    try:
        _wait_counting_on(dest)
    finally:
        dest.close()
