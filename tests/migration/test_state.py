"""Saved state on real /dev/kvm: a saved format imports into today's VMM (old -> new), a
newer writer's state imports too (rollback), and a device mid-I/O completes on the new VMM."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PATIENCE, needs_kvm, wait_until

from intrahost.migration import envelope
from intrahost.migration.envelope import Component
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.migration.sender import Sender
from intrahost.migration.state import config_of, decode_state, restore_machine, save_machine
from intrahost.service.runner import listen, receive
from intrahost.vmm.devices import uart as U
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import GuestMemory, MiB

pytestmark = needs_kvm

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = sorted(
    p.name.removeprefix("state-").removesuffix(".bin") for p in FIXTURES.glob("state-*.bin")
)


def _import(state_bytes: bytes, memory_image: bytes) -> Machine:
    state = decode_state(state_bytes)
    config = config_of(state)
    memory = GuestMemory.create(config.memory)
    memory.buffer[:] = memory_image
    machine = Machine(MachineConfig.from_dict(config.to_dict() | {"serial": "none"}), memory)
    restore_machine(machine, state)
    return machine


def _runs_on(machine: Machine, counter: int) -> None:
    machine.start()
    wait_until(
        lambda: layout.read_slot(machine.memory.buffer, 0).counter > counter,
        "the imported guest to continue",
        interval=0.01,
    )
    machine.pause()
    layout.verify_region(machine.memory.buffer, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_saved_format_imports_and_the_guest_continues(fmt: str) -> None:
    """Old -> new: every fixture ever written still imports."""
    state = (FIXTURES / f"state-{fmt}.bin").read_bytes()
    image = zlib.decompress((FIXTURES / f"memory-{fmt}.zlib").read_bytes())
    saved = layout.read_slot(image, 0).counter
    machine = _import(state, image)
    try:
        assert layout.read_slot(machine.memory.buffer, 0).counter == saved
        _runs_on(machine, saved)
    finally:
        machine.close()


def test_a_newer_writers_state_imports_for_a_rollback() -> None:
    """New -> old: a state with components this VMM does not know (optional) and a higher
    content revision still imports."""
    fmt = FORMATS[-1]
    state = envelope.decode((FIXTURES / f"state-{fmt}.bin").read_bytes())
    newer = envelope.encode(
        [
            *state.components.values(),
            Component("vcpu/0/future-feature", b"\x01\x02", required=False),
            Component("device/virtio-future", b"{}", required=False),
        ],
        minor=envelope.MINOR + 5,
    )
    image = zlib.decompress((FIXTURES / f"memory-{fmt}.zlib").read_bytes())
    machine = _import(newer, image)
    try:
        _runs_on(machine, layout.read_slot(image, 0).counter)
    finally:
        machine.close()


@pytest.fixture
def source(sockdir: Path) -> Iterator[Machine]:
    config = MachineConfig(
        memory=32 * MiB,
        guest="counter",
        guest_args="progress=4096",  # a line every few µs: the UART is always busy
        serial=f"file:{sockdir / 'serial-0.log'}",
    )
    machine = Machine.create(config)
    machine.start()
    yield machine
    machine.close()


def test_uart_output_in_the_fifo_and_a_pending_interrupt_complete_on_the_new_vmm(
    source: Machine, sockdir: Path
) -> None:
    serial_0 = sockdir / "serial-0.log"
    wait_until(lambda: " count=" in serial_0.read_text(), "the guest to print on the UART")
    # An interrupt pending at the hand-off: received data with its interrupt enabled.
    source.uart.write_register(U.IER, U.IER_RDA)
    assert source.uart.receive(b"X") == 1
    assert source.uart.irq_level
    # A console that stalls: the guest's output piles up in the TX FIFO.
    source.uart.pause()
    time.sleep(0.05)
    source.uart.resume()
    source.uart.pause()
    wait_until(lambda: source.uart.tx_pending, "output queued in the UART", interval=0.001)
    source.uart.resume()

    url = f"unix:{sockdir / 'mig.sock'}"
    listener = listen(url)
    box: dict[str, Machine] = {}
    override = {"serial": f"file:{sockdir / 'serial-1.log'}"}
    from intrahost.migration.receiver import ReceiveOptions

    thread = threading.Thread(
        target=lambda: box.setdefault(
            "m", receive(url, ReceiveOptions(overrides=override), listener=listener)
        )
    )
    thread.start()
    # Stall the console again right before the pause so bytes are queued at the save.
    source.uart.pause()
    wait_until(lambda: source.uart.tx_pending, "output queued in the UART", interval=0.001)
    # Sender.run pauses the machine (and keeps the UART paused), exports, hands off.
    Sender(source, url).run()
    thread.join(PATIENCE)
    dest = box["m"]
    try:
        assert dest.uart.irq_level, "the pending interrupt did not survive"
        assert dest.uart.read_register(U.RBR) == ord("X")
        serial_1 = sockdir / "serial-1.log"
        wait_until(lambda: " count=" in serial_1.read_text(), "the new VMM's guest to print")
        dest.group.pause()  # stop the guest, then let the UART drain what it holds
        dest.uart.flush(1.0)
    finally:
        dest.close()
    text = (sockdir / "serial-0.log").read_text() + (sockdir / "serial-1.log").read_text()
    lines = text.split("\n")[1:-1]  # the banner, and a last line the pause may have cut
    assert all(len(line) == 27 and line.startswith("cpu0 count=") for line in lines), (
        "a line was cut or doubled"
    )
    counts = [int(line.split("=")[1], 16) for line in lines]
    assert counts == [4096 * (i + 1) for i in range(len(counts))], "UART bytes lost or doubled"


@pytest.mark.parametrize("writer", ["fixture", "this-vmm"])
def test_the_import_sets_the_tsc_offset_then_msrs_in_dependency_order(
    writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One KVM_SET_MSRS per vCPU, after the TSC offset, with TSC_DEADLINE after IA32_TSC
    and KVM_ASYNC_PF_EN after KVM_ASYNC_PF_INT, whatever order the writer saved them in (an
    older VMM saved them sorted by index)."""
    from intrahost.kvm import objects

    tsc, deadline, pf_en, pf_int = 0x10, 0x6E0, 0x4B564D02, 0x4B564D06
    if writer == "fixture":
        data = (FIXTURES / f"state-{FORMATS[-1]}.bin").read_bytes()
        config = config_of(decode_state(data))
    else:
        config = MachineConfig(memory=16 * MiB, serial="none")
    machine = Machine(MachineConfig.from_dict(config.to_dict() | {"serial": "none"}),
                      GuestMemory.create(config.memory))  # fmt: skip
    try:
        if writer == "this-vmm":
            machine.start(paused=True)
            data = save_machine(machine)
        calls: list[tuple[str, list[int]]] = []
        set_msrs, set_offset = objects.Vcpu.set_msrs, objects.Vcpu.set_tsc_offset

        def record_msrs(vcpu: objects.Vcpu, msrs: Any) -> int:
            items = list(msrs)
            calls.append(("msrs", [i for i, _ in items]))
            return set_msrs(vcpu, items)

        def record_offset(vcpu: objects.Vcpu, offset: int) -> None:
            calls.append(("offset", []))
            set_offset(vcpu, offset)

        monkeypatch.setattr(objects.Vcpu, "set_msrs", record_msrs)
        monkeypatch.setattr(objects.Vcpu, "set_tsc_offset", record_offset)
        restore_machine(machine, decode_state(data))
    finally:
        machine.close()
    assert [name for name, _ in calls if name == "msrs"] == ["msrs"] * config.vcpus
    written = next(indices for name, indices in calls if name == "msrs")
    assert deadline in written and pf_en in written and pf_int in written
    if machine.features.tsc_offset:
        assert [name for name, _ in calls][:2] == ["offset", "msrs"]
        assert tsc not in written  # it would recompute the offset just set
    else:
        assert written.index(tsc) < written.index(deadline)
    assert written.index(pf_int) < written.index(pf_en)
    assert written.index(deadline) > max(
        written.index(i) for i in written if i not in (deadline, pf_en)
    )


def test_the_vcpu_meta_is_formatted_as_its_record_would_encode_it() -> None:
    from intrahost.kvm.objects import MsrEntries
    from intrahost.vmm.kvm_state import VcpuMeta, VcpuState, vcpu_meta_json

    for offset, sregs2 in ((None, False), (-(1 << 63), True), ((1 << 64) - 1, False)):
        state = VcpuState(
            index=0, cpuid=b"", mp_state=3, regs=None, sregs=None, sregs2=sregs2, xsave=None,
            xcrs=None, debugregs=None, lapic=b"", msrs=MsrEntries(b""), events=b"",
            tsc_khz=2_100_000, tsc_offset=offset, saved_at_ns=123456789,
        )  # fmt: skip
        record = VcpuMeta(
            saved_at_ns=123456789, mp_state=3, tsc_khz=2_100_000, sregs2=sregs2, tsc_offset=offset
        )
        assert vcpu_meta_json(state) == record.to_json()


def test_the_vm_meta_is_formatted_as_its_record_would_encode_it() -> None:
    from intrahost.vmm.kvm_state import VmMeta, vm_meta_json

    for saved_at in (0, 123456789, (1 << 63) - 1):
        assert vm_meta_json(saved_at) == VmMeta(saved_at).to_json()


@needs_kvm
def test_msrs_saved_in_this_hosts_order_are_written_back_raw_without_the_tsc() -> None:
    from intrahost.kvm.objects import MsrEntries
    from intrahost.vmm.kvm_state import MSR_IA32_TSC

    machine = Machine(MachineConfig(memory=16 * MiB, serial="none"), GuestMemory.create(16 * MiB))
    try:
        component: Any = machine.components()["vcpu/0"]
        state = component.save()
        assert [i for i, _ in state.msrs] == list(component.msr_order)
        fast = component._msrs_to_write(state, copy_offset=True)
        assert isinstance(fast, MsrEntries)
        assert MSR_IA32_TSC not in [i for i, _ in fast]
        # Another order (an older VMM, another host) takes the general path, same result.
        raw = state.msrs.raw
        entries = [raw[i : i + 16] for i in range(0, len(raw), 16)]
        state.msrs = MsrEntries(b"".join(reversed(entries)))
        slow = component._msrs_to_write(state, copy_offset=True)
        assert isinstance(slow, list)
        assert sorted(slow) == sorted(fast)
    finally:
        machine.close()


class _TwoStep(Faults):
    """A side that does not offer commit-with-state (as intrahost 0.1)."""

    def two_step_commit(self) -> bool:
        return True


@pytest.mark.parametrize("old_side", [None, "source", "destination"])
def test_commit_with_state_only_when_both_sides_offer_it(
    old_side: str | None, source: Machine, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intrahost.migration.protocol import Channel, Command
    from intrahost.migration.receiver import ReceiveOptions

    sent: list[int] = []
    original = Channel.send

    def send(self: Channel, kind: int, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "source":
            sent.append(kind)
        original(self, kind, *args, **kwargs)

    monkeypatch.setattr(Channel, "send", send)
    url = f"unix:{sockdir / 'mig.sock'}"
    listener = listen(url)
    box: dict[str, Any] = {}
    override = {"serial": f"file:{sockdir / 'serial-1.log'}"}
    dst_faults = _TwoStep() if old_side == "destination" else NO_FAULTS
    thread = threading.Thread(
        target=lambda: box.setdefault(
            "m",
            receive(url, ReceiveOptions(overrides=override), listener=listener, faults=dst_faults),
        )
    )
    thread.start()
    src_faults = _TwoStep() if old_side == "source" else NO_FAULTS
    result: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: result.setdefault("b", Sender(source, url, faults=src_faults).run()),
        name="source",
    )
    sender.start()
    sender.join(30)
    thread.join(10)
    box["m"].close()
    if old_side is None:
        assert Command.STATE_COMMIT in sent and Command.COMMIT not in sent
        assert Command.STATE not in sent
    else:
        assert Command.STATE in sent and Command.COMMIT in sent
        assert Command.STATE_COMMIT not in sent
    breakdown = result["b"]
    assert breakdown.paused_at_ns > 0
    assert breakdown.resumed_at_ns >= breakdown.paused_at_ns + breakdown.import_us * 1000


@pytest.mark.parametrize("old_side", [None, "source"])
def test_the_destination_assigns_irqfds_after_the_import_and_the_commit_point(
    old_side: str | None, sockdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a disk, on both commit paths (STATE_COMMIT, and STATE then COMMIT): the
    destination restores the state (the interrupt controllers), swaps the baton, only then
    assigns its irqfds and resumes; the disk guest keeps completing writes there."""
    from intrahost.migration import receiver as receiver_module
    from intrahost.migration.protocol import Baton
    from intrahost.migration.receiver import ReceiveOptions
    from intrahost.vmm.config import parse_disks
    from intrahost.vmm.guests.probe import DiskProbe

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    config = MachineConfig(
        memory=16 * MiB,
        guest="disk",
        guest_args="progress=1000000000",
        serial="none",
        disks=parse_disks([f"path={image}"]),
    )
    source = Machine.create(config)
    source.start()
    events: list[str] = []

    def on_destination(name: str) -> None:
        if threading.current_thread().name == "destination":
            events.append(name)

    restore, swap = receiver_module.restore_machine, Baton.swap
    attach, resume = Machine.attach_interrupts, Machine.resume

    def restoring(machine: Machine, state: Any) -> None:
        restore(machine, state)
        on_destination("restored")

    def swapping(self: Baton, expected: int, new: int, timeout: float = 10.0) -> int:
        found = swap(self, expected, new, timeout)
        on_destination(f"swap {expected}->{new}: found {found}")
        return found

    def attaching(self: Machine) -> None:
        on_destination("irqfds assigned")
        attach(self)

    def resuming(self: Machine) -> None:
        on_destination("resumed")
        resume(self)

    monkeypatch.setattr(receiver_module, "restore_machine", restoring)
    monkeypatch.setattr(Baton, "swap", swapping)
    monkeypatch.setattr(Machine, "attach_interrupts", attaching)
    monkeypatch.setattr(Machine, "resume", resuming)
    url = f"unix:{sockdir / 'mig.sock'}"
    listener = listen(url)
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("m", receive(url, ReceiveOptions(), listener=listener)),
        name="destination",
    )
    try:
        probe = DiskProbe(source.memory.buffer)
        wait_until(
            lambda: (s := probe.status()) is not None and s.writes_completed > 10,
            "the disk guest to write",
        )
        thread.start()
        faults = _TwoStep() if old_side == "source" else NO_FAULTS
        Sender(source, url, faults=faults).run()
        thread.join(PATIENCE)
        committed = f"swap {Baton.PENDING}->{Baton.COMMITTED}: found {Baton.PENDING}"
        assert events == ["restored", committed, "irqfds assigned", "resumed"], events
        destination: Machine = box["m"]
        status = DiskProbe(destination.memory.buffer).status()
        assert status is not None
        done = status.writes_completed
        wait_until(
            lambda: (s := probe.status()) is not None and s.writes_completed > done + 10,
            "the disk guest to complete writes on the destination",
        )
    finally:
        source.close()
        if "m" in box:
            box["m"].close()
