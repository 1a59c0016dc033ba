"""Devices: the I/O and MMIO buses, the 16550A UART and its consoles, the debug port."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PATIENCE, needs_kvm

from intrahost.errors import IntrahostError
from intrahost.kvm import MmioRead, MmioWrite, PortIn, PortOut
from intrahost.vmm.devices import (
    COM1_BASE,
    BufferConsole,
    Console,
    ConsoleError,
    DebugPort,
    DebugPortState,
    DebugPortStateError,
    FileConsole,
    IoBus,
    IoBusError,
    MmioBus,
    MmioBusError,
    PtyConsole,
    ReportKind,
    StdoutConsole,
    Uart16550,
    UartState,
    UartStateError,
    make_tag,
    open_console,
)
from intrahost.vmm.devices import uart as u
from intrahost.vmm.devices.bus import MMIO_UNCLAIMED_WARN_LIMIT
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

# -- helpers -----------------------------------------------------------------------------


class IrqLine:
    """Records every level the UART reports."""

    def __init__(self) -> None:
        self.edges: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.edges.append(level)

    def take(self) -> list[bool]:
        edges, self.edges = self.edges, []
        return edges


def make_uart(
    console: Console | None = None, *, immediate: bool = True
) -> tuple[Uart16550, BufferConsole, IrqLine]:
    sink = console if console is not None else BufferConsole()
    assert isinstance(sink, BufferConsole)
    irq = IrqLine()
    return Uart16550(sink, irq, immediate=immediate), sink, irq


def outb(uart: Uart16550, offset: int, value: int) -> None:
    uart.pio_write(COM1_BASE + offset, 1, value)


def inb(uart: Uart16550, offset: int) -> int:
    return uart.pio_read(COM1_BASE + offset, 1)


def send(uart: Uart16550, data: bytes) -> None:
    for byte in data:
        outb(uart, u.THR, byte)


def wait_until(predicate: Callable[[], bool], timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# -- I/O bus -----------------------------------------------------------------------------


class Recorder:
    def __init__(self, answer: int = 0x5A) -> None:
        self.answer = answer
        self.calls: list[tuple[str, int, int, int]] = []

    def pio_read(self, port: int, size: int) -> int:
        self.calls.append(("r", port, size, 0))
        return self.answer

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.calls.append(("w", port, size, value))


def test_bus_dispatches_with_absolute_ports() -> None:
    bus = IoBus()
    a, b = Recorder(0x11), Recorder(0x22)
    bus.register(0x3F8, 8, a, "com1")
    bus.register(0x500, 16, b, "debug")
    assert bus.read(0x3FD, 1) == 0x11
    bus.write(0x50C, 1, 0x1FF)  # masked to the access size
    assert a.calls == [("r", 0x3FD, 1, 0)]
    assert b.calls == [("w", 0x50C, 1, 0xFF)]
    assert [r.name for r in bus.ranges] == ["com1", "debug"]
    assert bus.find(0x3F7) is None and bus.find(0x400) is None


def test_bus_refuses_overlaps_but_allows_neighbours() -> None:
    bus = IoBus()
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(IoBusError, match=r"overlaps com1 at 0x03f8\.\.0x03ff"):
        bus.register(0x3FF, 2, Recorder(), "late")
    with pytest.raises(IoBusError, match="overlaps"):
        bus.register(0x3F0, 0x20, Recorder(), "covering")
    bus.register(0x3F0, 8, Recorder(), "below")
    bus.register(0x400, 1, Recorder(), "above")
    assert len(bus.ranges) == 3
    with pytest.raises(IoBusError, match=r"0x0000\.\.0xffff"):
        bus.register(0xFFFF, 2, Recorder())
    with pytest.raises(IoBusError, match="length must be positive"):
        bus.register(0x10, 0, Recorder())
    assert isinstance(IoBusError("x"), IntrahostError)


def test_bus_unclaimed_ports_read_all_ones_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = IoBus()
    with caplog.at_level(logging.DEBUG, logger="intrahost.vmm.devices.bus"):
        assert bus.read(0x80, 1) == 0xFF
        assert bus.read(0x80, 2) == 0xFFFF
        assert bus.read(0x80, 4) == 0xFFFF_FFFF
        bus.write(0x80, 1, 0x12)
        bus.write(0x81, 1, 0x12)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "0x0080" in messages[0] and "0x0081" in messages[1]
    assert bus.unclaimed_accesses == 5
    with pytest.raises(IoBusError, match="size must be 1, 2 or 4"):
        bus.read(0x80, 3)


def test_bus_is_safe_to_read_while_registering() -> None:
    bus = IoBus()
    bus.register(0x10, 1, Recorder(7))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert bus.read(0x10, 1) == 7
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    for port in range(0x100, 0x300):
        bus.register(port, 1, Recorder())
    stop.set()
    thread.join()
    assert not errors


def _page() -> mmap.mmap:
    """A stand-in for a vCPU's kvm_run page that read exits complete into."""
    return mmap.mmap(-1, 4096)


def test_bus_dispatches_port_exit_records() -> None:
    bus = IoBus()
    device = Recorder(0x1234)
    bus.register(0x500, 16, device, "debug")
    bus.dispatch(PortOut(0x504, 4, 1, (0xCAFE).to_bytes(4, "little")))
    bus.dispatch(PortOut(0x500, 1, 3, b"abc"))  # rep outsb: every item, in order
    assert device.calls == [
        ("w", 0x504, 4, 0xCAFE),
        ("w", 0x500, 1, 0x61),
        ("w", 0x500, 1, 0x62),
        ("w", 0x500, 1, 0x63),
    ]
    page = _page()
    bus.dispatch(PortIn(0x502, 2, 1, page, 0x100))
    assert page[0x100:0x102] == b"\x34\x12"
    bus.dispatch(PortIn(0x502, 2, 3, page, 0x200))  # rep insw
    assert page[0x200:0x206] == b"\x34\x12" * 3
    bus.dispatch(PortIn(0x80, 4, 1, page, 0x300))  # nobody there: all ones
    assert page[0x300:0x304] == b"\xff" * 4


class MmioRecorder:
    def __init__(self, answer: int = 0x5A) -> None:
        self.answer = answer
        self.calls: list[tuple[str, int, int, int]] = []

    def mmio_read(self, address: int, size: int) -> int:
        self.calls.append(("r", address, size, 0))
        return self.answer

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.calls.append(("w", address, size, value))


def test_mmio_bus_dispatches_with_absolute_addresses() -> None:
    bus = MmioBus()
    device = MmioRecorder(0x1_2345_6789)
    bus.register(0xD000_0000, 0x200, device, "virtio0")
    page = _page()
    read = MmioRead(0xD000_0008, 4, page)
    bus.dispatch(read)  # masked to the access size
    assert page[40:44] == (0x2345_6789).to_bytes(4, "little")  # kvm_run.mmio.data
    bus.dispatch(MmioWrite(0xD000_0010, 8, (0x1122_3344_5566_7788).to_bytes(8, "little")))
    assert device.calls == [("r", 0xD000_0008, 4, 0), ("w", 0xD000_0010, 8, 0x1122_3344_5566_7788)]
    assert [str(r) for r in bus.ranges] == ["virtio0 at 0xd0000000..0xd00001ff"]
    assert bus.find(0xD000_0200) is None and bus.find(0xCFFF_FFFF) is None


def test_mmio_bus_refuses_overlaps_and_bad_ranges() -> None:
    bus = MmioBus()
    bus.register(0xD000_0000, 0x200, MmioRecorder(), "virtio0")
    with pytest.raises(MmioBusError, match=r"overlaps virtio0 at 0xd0000000\.\.0xd00001ff"):
        bus.register(0xD000_01FF, 2, MmioRecorder(), "late")
    bus.register(0xD000_0200, 0x200, MmioRecorder(), "virtio1")
    with pytest.raises(MmioBusError, match="2\\*\\*64"):
        bus.register((1 << 64) - 1, 2, MmioRecorder())
    with pytest.raises(MmioBusError, match="length must be positive"):
        bus.register(0, 0, MmioRecorder())
    with pytest.raises(MmioBusError, match="size must be 1 to 8"):
        bus.read(0xD000_0000, 16)
    assert isinstance(MmioBusError("x"), IntrahostError)


def test_mmio_bus_unclaimed_reads_all_ones_and_warns_once_per_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MmioBus()
    page = _page()
    with caplog.at_level(logging.DEBUG, logger="intrahost.vmm.devices.bus"):
        for _ in range(3):
            bus.dispatch(MmioRead(0xFEB0_0000, 2, page))
            assert page[40:42] == b"\xff\xff"
            page[40:42] = b"\0\0"
        bus.dispatch(MmioWrite(0xFEB0_0010, 1, b"\x12"))
        for i in range(MMIO_UNCLAIMED_WARN_LIMIT + 10):  # a guest probing memory
            bus.read(0x1_0000_0000 + 8 * i, 8)
    messages = [r.getMessage() for r in caplog.records]
    assert "read at 0xfeb00000 (2 bytes)" in messages[0]
    assert "write at 0xfeb00010 (1 bytes)" in messages[1]
    assert len(messages) == MMIO_UNCLAIMED_WARN_LIMIT + 1  # one per address, then one notice
    assert "further ones are not logged" in messages[-1]
    assert bus.unclaimed_accesses == 3 + 1 + MMIO_UNCLAIMED_WARN_LIMIT + 10


# -- UART registers ----------------------------------------------------------------------


def test_uart_reset_values() -> None:
    uart, _, _ = make_uart()
    assert inb(uart, u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert inb(uart, u.IIR) == u.IIR_NO_INT
    assert inb(uart, u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS
    assert inb(uart, u.IER) == 0
    assert inb(uart, u.LCR) == 0
    assert inb(uart, u.MCR) == 0


def test_uart_divisor_latch() -> None:
    uart, console, _ = make_uart()
    outb(uart, u.LCR, u.LCR_DLAB | 0x03)
    outb(uart, u.DLL, 0x01)
    outb(uart, u.DLM, 0x02)
    assert inb(uart, u.DLL) == 0x01
    assert inb(uart, u.DLM) == 0x02
    outb(uart, u.LCR, 0x03)  # 8N1, latch closed: offsets 0 and 1 are THR/RBR and IER again
    assert inb(uart, u.IER) == 0
    outb(uart, u.IER, 0xFF)
    assert inb(uart, u.IER) == 0x0F  # a 16550A has four interrupt enables
    assert console.data == b""  # the DLL write was not transmitted
    outb(uart, u.LCR, u.LCR_DLAB)
    assert (inb(uart, u.DLM) << 8) | inb(uart, u.DLL) == 0x0201


def test_uart_scratch_and_read_only_registers() -> None:
    uart, _, _ = make_uart()
    outb(uart, u.SCR, 0xA5)
    assert inb(uart, u.SCR) == 0xA5
    outb(uart, u.LSR, 0x00)
    outb(uart, u.MSR, 0x00)
    assert inb(uart, u.LSR) == 0x60
    assert inb(uart, u.MSR) & 0xF0 == 0xB0
    outb(uart, u.MCR, 0xFF)
    assert inb(uart, u.MCR) == 0x1F


def test_uart_transmits_immediately_by_default() -> None:
    uart, console, _ = make_uart()
    send(uart, b"hello\n")
    assert console.data == b"hello\n"
    assert inb(uart, u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
    assert uart.bytes_written == 6
    assert uart.tx_pending == b""


def test_uart_wide_access_touches_consecutive_registers() -> None:
    uart, _, _ = make_uart()
    outb(uart, u.SCR, 0x42)
    # A 16-bit read at LSR returns LSR in the low byte and MSR in the high byte.
    assert uart.pio_read(COM1_BASE + u.LSR, 2) == 0x60 | (0xB0 << 8)
    # A 16-bit write at LCR/MCR sets both.
    uart.pio_write(COM1_BASE + u.LCR, 2, 0x0B03)
    assert inb(uart, u.LCR) == 0x03 and inb(uart, u.MCR) == 0x0B
    # Bytes past the device read as all-ones.
    assert uart.pio_read(COM1_BASE + u.SCR, 2) == 0x42 | 0xFF00


def test_uart_receive_sets_data_ready() -> None:
    uart, _, _ = make_uart()
    assert uart.receive(b"x") == 1
    assert inb(uart, u.LSR) & u.LSR_DR
    assert inb(uart, u.RBR) == ord("x")
    assert not inb(uart, u.LSR) & u.LSR_DR
    assert inb(uart, u.RBR) == 0  # empty


def test_uart_rx_fifo_limit_and_overrun() -> None:
    uart, _, _ = make_uart()
    assert uart.receive(b"ab") == 1  # FIFOs off: a one-byte holding register
    assert inb(uart, u.LSR) & u.LSR_OE  # the second byte overran
    assert not inb(uart, u.LSR) & u.LSR_OE  # reading LSR clears OE
    assert inb(uart, u.RBR) == ord("a")

    outb(uart, u.FCR, u.FCR_ENABLE)
    data = bytes(range(0x41, 0x41 + 20))
    assert uart.receive(data) == 16
    assert uart.rx_overruns == 1 + 4
    lsr = inb(uart, u.LSR)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    received = bytes(inb(uart, u.RBR) for _ in range(16))
    assert received == data[:16]
    assert not inb(uart, u.LSR) & u.LSR_DR


def test_uart_tx_fifo_limit_while_paused() -> None:
    uart, console, _ = make_uart()
    uart.pause()
    send(uart, b"ab")  # FIFOs off: only the holding register
    assert uart.tx_pending == b"a" and uart.tx_dropped == 1
    assert not inb(uart, u.LSR) & (u.LSR_THRE | u.LSR_TEMT)
    uart.resume()
    assert console.take() == b"a"

    outb(uart, u.FCR, u.FCR_ENABLE)
    uart.pause()
    send(uart, bytes(range(20)))
    assert uart.tx_pending == bytes(range(16))
    assert uart.tx_dropped == 1 + 4
    assert console.data == b""
    assert uart.flush() == 0  # flush writes nothing while paused
    uart.resume()
    assert console.take() == bytes(range(16))
    assert inb(uart, u.LSR) & u.LSR_THRE


def test_uart_fcr_clears_fifos_and_shows_in_iir() -> None:
    uart, _, _ = make_uart()
    outb(uart, u.FCR, u.FCR_ENABLE)
    assert inb(uart, u.IIR) == u.IIR_NO_INT | u.IIR_FIFO
    uart.receive(b"abc")
    uart.pause()
    send(uart, b"xyz")
    outb(uart, u.FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert not inb(uart, u.LSR) & u.LSR_DR
    assert uart.tx_pending == b"xyz"
    outb(uart, u.FCR, u.FCR_ENABLE | u.FCR_CLEAR_TX)
    assert uart.tx_pending == b""
    uart.receive(b"abc")
    outb(uart, u.FCR, 0)  # turning the FIFOs off empties them
    assert not inb(uart, u.LSR) & u.LSR_DR
    assert inb(uart, u.IIR) == u.IIR_NO_INT


def test_uart_iir_priorities() -> None:
    uart, _, _ = make_uart()
    # Make a modem status change: loopback on then off changes CTS, DSR and DCD.
    outb(uart, u.MCR, u.MCR_LOOP)
    outb(uart, u.MCR, 0)
    uart.receive(b"12")  # overruns the one-byte holding register: line status + data
    outb(uart, u.IER, u.IER_RDA | u.IER_THRE | u.IER_RLS | u.IER_MS)  # THR empty: pending

    assert inb(uart, u.IIR) == u.IIR_RLS
    assert inb(uart, u.IIR) == u.IIR_RLS  # stays until LSR is read
    inb(uart, u.LSR)
    assert inb(uart, u.IIR) == u.IIR_RDA
    inb(uart, u.RBR)
    assert inb(uart, u.IIR) == u.IIR_THRE
    assert inb(uart, u.IIR) == u.IIR_MS  # reading IIR acknowledged "THR empty"
    msr = inb(uart, u.MSR)
    assert msr & u.MSR_DELTAS == u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    assert inb(uart, u.IIR) == u.IIR_NO_INT


def test_uart_interrupt_enables_gate_iir() -> None:
    uart, _, _ = make_uart()
    uart.receive(b"x")
    assert inb(uart, u.IIR) == u.IIR_NO_INT
    outb(uart, u.IER, u.IER_RDA)
    assert inb(uart, u.IIR) == u.IIR_RDA


def test_uart_fifo_trigger_level_and_character_timeout() -> None:
    uart, _, _ = make_uart()
    outb(uart, u.FCR, u.FCR_ENABLE | 0xC0)  # trigger at 14 bytes
    outb(uart, u.IER, u.IER_RDA)
    uart.receive(b"abc")
    assert inb(uart, u.IIR) == u.IIR_TIMEOUT | u.IIR_FIFO
    uart.receive(b"d" * 11)
    assert inb(uart, u.IIR) == u.IIR_RDA | u.IIR_FIFO


def test_uart_loopback() -> None:
    uart, console, _ = make_uart()
    outb(uart, u.MCR, u.MCR_LOOP | u.MCR_RTS | u.MCR_OUT2)
    # The check Linux's 8250 driver makes: RTS -> CTS, OUT2 -> DCD.
    assert inb(uart, u.MSR) & 0xF0 == u.MSR_CTS | u.MSR_DCD
    outb(uart, u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_OUT1)
    assert inb(uart, u.MSR) == u.MSR_DSR | u.MSR_RI | u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    outb(uart, u.MCR, u.MCR_LOOP)
    assert inb(uart, u.MSR) & u.MSR_TERI  # RI went away
    outb(uart, u.FCR, u.FCR_ENABLE)
    send(uart, b"ping")
    assert console.data == b""  # nothing leaves the chip
    assert uart.bytes_written == 0
    assert bytes(inb(uart, u.RBR) for _ in range(4)) == b"ping"
    assert uart.receive(b"outside") == 0  # serial input is disconnected in loopback
    outb(uart, u.MCR, 0)
    send(uart, b"!")
    assert console.data == b"!"


def test_uart_interrupt_line_edges() -> None:
    uart, _, irq = make_uart()
    outb(uart, u.IER, u.IER_RDA)
    assert irq.take() == []
    uart.receive(b"a")
    assert irq.take() == [True]
    inb(uart, u.RBR)
    assert irq.take() == [False]

    outb(uart, u.IER, u.IER_THRE)  # enabling "THR empty" while empty raises it
    assert irq.take() == [True]
    assert inb(uart, u.IIR) == u.IIR_THRE
    assert irq.take() == [False]
    outb(uart, u.THR, ord("x"))  # transmitted at once: THR empty again
    assert irq.take() == [True]
    outb(uart, u.THR, ord("y"))  # the write acknowledges, the drain re-arms: a pulse
    assert irq.take() == [False, True]
    outb(uart, u.IER, 0)
    assert irq.take() == [False]
    assert uart.irq_level is False


def test_uart_thr_interrupt_waits_for_the_console() -> None:
    uart, console, irq = make_uart()
    outb(uart, u.IER, u.IER_THRE)
    inb(uart, u.IIR)
    irq.take()
    uart.pause()
    outb(uart, u.THR, ord("q"))
    assert irq.take() == []  # still queued: no "THR empty"
    assert inb(uart, u.IIR) == u.IIR_NO_INT
    uart.resume()
    assert console.data == b"q"
    assert irq.take() == [True]


# -- UART output as state ----------------------------------------------------------------


def test_uart_save_requires_pause() -> None:
    uart, _, _ = make_uart()
    with pytest.raises(UartStateError, match=r"call pause\(\) first"):
        uart.save()


def test_uart_queued_output_moves_to_the_new_owner() -> None:
    old, old_console, _ = make_uart()
    outb(old, u.FCR, u.FCR_ENABLE)
    send(old, b"boot: ")
    old.pause()  # the VMM pauses the device before exporting it
    send(old, b"still queued")
    state = old.save()
    assert state.tx_fifo == b"still queued"
    assert not state.tx_fifo.startswith(b"boot")
    old.close()  # paused: the queued bytes are not written by the old owner
    assert old_console.data == b"boot: "

    new_console = BufferConsole(description="new target")
    irq = IrqLine()
    new = Uart16550(new_console, irq)
    new.restore(UartState.from_dict(json.loads(json.dumps(state.to_dict()))))
    assert new_console.data == b"still queued"
    send(new, b" and more")
    assert old_console.data + new_console.data == b"boot: still queued and more"
    assert new.bytes_written == len(b"boot: still queued and more")


def test_uart_restore_while_paused_waits_for_resume() -> None:
    old, _, _ = make_uart()
    old.pause()
    send(old, b"z")
    state = old.save()
    new, console, _ = make_uart()
    new.pause()
    new.restore(state)
    assert console.data == b"" and new.tx_pending == b"z"
    new.resume()
    assert console.data == b"z"


def test_uart_restore_carries_registers_and_interrupts() -> None:
    old, _, _ = make_uart()
    outb(old, u.LCR, u.LCR_DLAB)
    outb(old, u.DLL, 0x03)
    outb(old, u.LCR, 0x1B)
    outb(old, u.FCR, u.FCR_ENABLE | 0x40)
    outb(old, u.MCR, u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2)
    outb(old, u.SCR, 0x77)
    outb(old, u.IER, u.IER_RDA | u.IER_THRE)
    old.receive(b"in")
    old.pause()
    state = old.save()
    assert state.thr_ipending and state.rx_fifo == b"in"

    new, _, irq = make_uart()
    new.restore(state)
    assert irq.take() == [True]  # the new owner's line is told the restored level
    assert [inb(new, r) for r in (u.LCR, u.MCR, u.SCR, u.IER)] == [0x1B, 0x0B, 0x77, 0x03]
    assert inb(new, u.IIR) == u.IIR_TIMEOUT | u.IIR_FIFO
    assert bytes([inb(new, u.RBR), inb(new, u.RBR)]) == b"in"
    assert inb(new, u.IIR) == u.IIR_THRE | u.IIR_FIFO
    new.pause()
    assert new.save() == UartState(**{**state.__dict__, "rx_fifo": b"", "thr_ipending": False})
    outb(new, u.LCR, 0x9B)
    assert inb(new, u.DLL) == 0x03


def test_uart_state_dict_validation() -> None:
    uart, _, _ = make_uart()
    uart.pause()
    good = uart.save().to_dict()
    assert UartState.from_dict(good) == uart.save()
    bad_cases: list[tuple[dict[str, object], str]] = [
        ({**good, "version": 99}, "version 99"),
        ({k: v for k, v in good.items() if k != "ier"}, "missing keys"),
        ({**good, "tx_fifo": "zz"}, "not valid hex"),
        ({**good, "tx_fifo": b"\x00".hex() * 2}, "more than the 1"),
        ({**good, "ier": 0x10}, "cannot hold"),
        ({**good, "lcr": 256}, "lcr must be an integer"),
        ({**good, "lcr": True}, "lcr must be an integer"),
        ({**good, "thr_ipending": 1}, "must be a bool"),
        ({**good, "rx_fifo": 5}, "must be a hex string"),
    ]
    for data, message in bad_cases:
        with pytest.raises(UartStateError, match=message):
            UartState.from_dict(data)
    with pytest.raises(UartStateError, match="mapping"):
        UartState.from_dict([])  # type: ignore[arg-type]


def test_device_records_from_a_newer_vmm_read_for_a_rollback() -> None:
    """A newer VMM may add a field to a device record: an older one ignores it (it used to
    refuse the whole record, so no device field could ever be added)."""
    uart, _, _ = make_uart()
    uart.pause()
    newer = {**uart.save().to_dict(), "future_register": 7, "future_fifo": "00"}
    assert UartState.from_dict(newer) == uart.save()
    port = DebugPort()
    report(port, 1, 2)
    newer = {**port.save().to_dict(), "future": [1, 2, 3]}
    assert DebugPortState.from_dict(newer) == port.save()


@settings(max_examples=60, deadline=None)
@given(
    text=st.binary(min_size=0, max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    capacity=st.integers(min_value=1, max_value=8),
)
def test_uart_output_survives_any_number_of_handoffs(
    text: bytes, cuts: list[int], capacity: int
) -> None:
    """Whatever the console's speed and wherever the hand-offs fall, every byte the guest
    wrote reaches exactly one console, once, in order."""
    collected = bytearray()
    console = BufferConsole(capacity=capacity)
    uart = Uart16550(console)
    outb(uart, u.FCR, u.FCR_ENABLE)
    cut_points = set(cuts)
    for i, byte in enumerate(text):
        if i in cut_points:
            uart.pause()
            state = uart.save()
            uart.close()
            collected += console.take()
            console = BufferConsole(capacity=capacity)
            uart = Uart16550(console)
            uart.restore(state)
        # A polling driver: wait for room in the FIFO; a slow reader drains the console.
        while len(uart.tx_pending) >= u.FIFO_SIZE:
            collected += console.take()
            uart.flush()
        outb(uart, u.THR, byte)
    while uart.tx_pending:
        collected += console.take()
        uart.flush()
    collected += console.take()
    assert bytes(collected) == text
    assert uart.bytes_written == len(text)
    assert uart.tx_dropped == 0


def test_uart_writer_thread_drains_in_deferred_mode() -> None:
    uart, console, _ = make_uart(immediate=False)
    outb(uart, u.FCR, u.FCR_ENABLE)
    send(uart, b"later")
    assert console.data == b"" and uart.tx_pending == b"later"
    uart.start()
    try:
        wait_until(lambda: console.data == b"later")
        send(uart, b"!")
        wait_until(lambda: console.data == b"later!")
    finally:
        uart.close()


def test_uart_writer_thread_retries_a_console_that_pushes_back() -> None:
    console = BufferConsole(capacity=3)
    uart = Uart16550(console)
    outb(uart, u.FCR, u.FCR_ENABLE)
    uart.start()
    try:
        send(uart, b"abcdefgh")
        assert console.data == b"abc" and uart.tx_pending == b"defgh"
        assert not inb(uart, u.LSR) & u.LSR_THRE
        got = bytearray()

        def slow_reader_has_everything() -> bool:
            got.extend(console.take())  # each take() makes room; the writer thread refills
            return bytes(got) == b"abcdefgh"

        wait_until(slow_reader_has_everything)
        assert uart.tx_pending == b""
    finally:
        uart.close()


def test_uart_close_flushes_unless_paused() -> None:
    uart, console, _ = make_uart(immediate=False)
    send(uart, b"x")
    uart.close()
    assert console.data == b"x"


def test_uart_broken_console_does_not_stop_the_guest(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Console):
        def write(self, data: bytes) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    uart = Uart16550(Broken())
    with caplog.at_level(logging.WARNING):
        send(uart, b"abc")
    assert inb(uart, u.LSR) & u.LSR_THRE
    assert uart.tx_discarded == 3
    assert sum("discarding its output" in r.getMessage() for r in caplog.records) == 1


def test_uart_reader_thread_feeds_input_and_honours_pause() -> None:
    uart, console, _ = make_uart()
    outb(uart, u.FCR, u.FCR_ENABLE)
    uart.start()
    try:
        console.push_input(b"hi")
        wait_until(lambda: bool(inb(uart, u.LSR) & u.LSR_DR))
        wait_until(lambda: console.pending_input == 0)
        assert bytes([inb(uart, u.RBR), inb(uart, u.RBR)]) == b"hi"
        uart.pause()
        time.sleep(0.2)  # let the reader settle into its paused wait
        console.push_input(b"typed during pause")
        time.sleep(0.3)
        assert not inb(uart, u.LSR) & u.LSR_DR
        uart.resume()
        got = bytearray()

        def read_all() -> bool:
            while inb(uart, u.LSR) & u.LSR_DR:
                got.append(inb(uart, u.RBR))
            return bytes(got) == b"typed during pause"

        wait_until(read_all)  # more than the FIFO holds: the reader waits for room
        assert uart.rx_overruns == 0
    finally:
        uart.close()


# -- consoles ----------------------------------------------------------------------------


def test_open_console_specs(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "serial.log")
    with open(path, "wb") as f:
        f.write(b"old\n")
    console = open_console(f"file:{path}")
    assert isinstance(console, FileConsole) and console.description == f"file:{path}"
    uart = Uart16550(console)
    send(uart, b"new\n")
    uart.close()
    with open(path, "rb") as f:
        assert f.read() == b"old\nnew\n"  # appended
    assert open_console("null").write(b"abc") == 3
    for spec, message in [
        ("file:", "needs a path"),
        ("serial", "unknown console 'serial'"),
        (f"file:{tmp_path}/missing/dir/x", "cannot open console file"),
    ]:
        with pytest.raises(ConsoleError, match=message):
            open_console(spec)


def test_stdout_console(capfd: pytest.CaptureFixture[str]) -> None:
    uart = Uart16550(open_console("stdout"))
    send(uart, b"to stdout\n")
    uart.close()  # the console's writer thread writes what it holds
    assert capfd.readouterr().out == "to stdout\n"


class Reader:
    """The read end of the pipe under sys.stdout; nobody reads it unless a test does."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def read(self, n: int) -> bytes:
        assert self.fd is not None
        return os.read(self.fd, n)

    def close(self) -> None:
        """Closing ends any write still blocked on the pipe (EPIPE)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def stdout_on_a_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reader]:
    """sys.stdout on a one-page pipe that nobody reads unless the test does (set inside the
    test: pytest's capture sets sys.stdout again between a fixture and the test)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    stream = io.TextIOWrapper(open(write_end, "wb"), write_through=True)  # noqa: SIM115
    reader = Reader(read_end)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        yield reader
    finally:
        reader.close()
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            stream.close()


def test_stdout_console_writes_never_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe nobody reads fills; the UART's writes still return at once and the console
    drops, and counts, what its buffer cannot hold."""
    with stdout_on_a_pipe(monkeypatch):
        console = StdoutConsole(capacity=1024)
        uart = Uart16550(console)
        outb(uart, u.FCR, u.FCR_ENABLE)
        t0 = time.monotonic()
        send(uart, bytes(range(256)) * 64)  # 16 KiB: more than the pipe and the buffer
        assert time.monotonic() - t0 < 10
        assert uart.tx_pending == b"" and uart.console_dropped == console.dropped
        # Held: the pipe's page, the buffer, and at most the buffer's worth being written.
        assert console.dropped >= 16 * 1024 - 4096 - 2 * 1024
        uart.close()  # gives up on the stuck pipe after a while


def test_stdout_console_reports_a_broken_pipe_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with stdout_on_a_pipe(monkeypatch) as reader:
        console = StdoutConsole()
        uart = Uart16550(console)
        send(uart, b"first")
        assert console.flush(5)
        assert reader.read(100) == b"first"
        reader.close()
        with caplog.at_level(logging.WARNING):
            send(uart, b"lost")
            assert console.flush(5)
            send(uart, b"more")
        assert uart.console_dropped == len(b"lostmore")
        assert sum("discarding its output" in r.getMessage() for r in caplog.records) == 1
        uart.close()


def test_file_console_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "serial.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConsoleError, match="FIFO that nobody reads"):
        open_console(f"file:{fifo}")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        console = open_console(f"file:{fifo}")
        fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        uart = Uart16550(console)
        outb(uart, u.FCR, u.FCR_ENABLE)
        t0 = time.monotonic()
        send(uart, b"x" * 8192)
        assert time.monotonic() - t0 < 10
        assert console.dropped == 8192 - 4096 and uart.tx_pending == b""
        assert os.read(reader, 8192) == b"x" * 4096
        uart.close()
    finally:
        os.close(reader)


@needs_kvm
def test_a_guest_printing_to_an_unread_stdout_can_still_be_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with stdout_on_a_pipe(monkeypatch) as reader:
        config = MachineConfig(
            memory=16 * MiB, guest="counter", guest_args="progress=4096", serial="stdio"
        )
        machine = Machine.create(config)
        try:
            console = machine.uart.console
            assert isinstance(console, StdoutConsole)
            console.capacity = 4096  # fill up sooner
            machine.start()
            wait_until(lambda: machine.query()["serial-dropped"] > 0, timeout=30)
            t0 = time.monotonic()
            machine.pause(timeout=5)
            assert time.monotonic() - t0 < 2
            dropped = machine.query()["serial-dropped"]
            machine.resume()
            wait_until(lambda: machine.query()["serial-dropped"] > dropped)
        finally:
            reader.close()  # (a vCPU blocked on the pipe gets EPIPE)
            machine.close()


def test_pty_console_round_trip() -> None:
    try:
        console = open_console("pty")
    except ConsoleError as error:
        pytest.skip(f"no pseudo-terminals here: {error}")
    assert isinstance(console, PtyConsole)
    assert console.slave_path.startswith("/dev/pts/")
    uart = Uart16550(console)
    outb(uart, u.FCR, u.FCR_ENABLE)
    uart.start()
    try:
        assert not console.connected
        send(uart, b"nobody listens")  # discarded, the guest does not stall
        assert uart.tx_pending == b"" and console.dropped == len(b"nobody listens")
        slave = os.open(console.slave_path, os.O_RDWR | os.O_NOCTTY)
        try:
            assert console.connected
            send(uart, b"guest says hi")
            got = b""
            while len(got) < len(b"guest says hi"):
                got += os.read(slave, 100)
            assert got == b"guest says hi"
            os.write(slave, b"typed\r")
            received = bytearray()

            def read_all() -> bool:
                while inb(uart, u.LSR) & u.LSR_DR:
                    received.append(inb(uart, u.RBR))
                return bytes(received) == b"typed\r"  # raw mode: no echo, no translation

            wait_until(read_all)
        finally:
            os.close(slave)
    finally:
        uart.close()


# -- debug port --------------------------------------------------------------------------


def report(port: DebugPort, tag: int, value: int) -> None:
    port.pio_write(0x500, 4, tag)
    port.pio_write(0x504, 4, value & 0xFFFF_FFFF)
    port.pio_write(0x508, 4, value >> 32)


def test_debug_port_reports() -> None:
    port = DebugPort()
    tag = make_tag(ReportKind.COUNTER, 2)
    assert tag == 0x0002_0001
    report(port, tag, 0x1_2345_6789)
    report(port, make_tag(ReportKind.HELLO, 0), 7)
    report(port, tag, 10)
    assert [r.value for r in port.reports] == [0x1_2345_6789, 7, 10]
    latest = port.latest(tag)
    assert latest is not None
    assert (latest.seq, latest.value, latest.kind, latest.vcpu) == (2, 10, ReportKind.COUNTER, 2)
    assert port.latest(make_tag(ReportKind.CHECKSUM, 0)) is None
    assert port.report_count == 3
    assert port.pio_read(0x500, 4) == 0
    odd = DebugPort()
    report(odd, 0x99, 1)
    assert odd.reports[0].kind == 0x99  # unknown kinds stay plain ints


def test_debug_port_history_is_bounded_but_latest_is_kept() -> None:
    port = DebugPort(report_limit=3)
    report(port, make_tag(ReportKind.HELLO, 0), 1)
    for i in range(10):
        report(port, make_tag(ReportKind.COUNTER, 0), i)
    assert [r.value for r in port.reports] == [7, 8, 9]
    hello = port.latest(make_tag(ReportKind.HELLO, 0))
    assert hello is not None and hello.value == 1


def test_debug_port_exit_calls_back_once() -> None:
    port = DebugPort()
    codes: list[int] = []
    port.on_exit = codes.append
    assert port.exit_code is None
    port.pio_write(0x50C, 1, 3)
    port.pio_write(0x50C, 1, 4)
    assert port.exit_code == 3
    assert codes == [3]


def test_debug_port_latches_per_vcpu() -> None:
    current = threading.local()

    def vcpu() -> int:
        return int(getattr(current, "index", 0))

    port = DebugPort(current_vcpu=vcpu)
    current.index = 0
    port.pio_write(0x500, 4, make_tag(ReportKind.COUNTER, 0))
    current.index = 1
    port.pio_write(0x500, 4, make_tag(ReportKind.COUNTER, 1))
    port.pio_write(0x504, 4, 111)
    current.index = 0
    port.pio_write(0x504, 4, 100)
    port.pio_write(0x508, 4, 0)
    current.index = 1
    port.pio_write(0x508, 4, 0)
    assert [(r.vcpu, r.value) for r in port.reports] == [(0, 100), (1, 111)]


def test_debug_port_save_restore_mid_report() -> None:
    port = DebugPort()
    report(port, make_tag(ReportKind.MAX_GAP, 1), 5)
    port.pio_write(0x500, 4, make_tag(ReportKind.CHECKSUM, 0))
    port.pio_write(0x504, 4, 0xAB)  # paused here, before the commit
    state = port.save()
    data = json.loads(json.dumps(state.to_dict()))
    new = DebugPort()
    new.restore(DebugPortState.from_dict(data))
    new.pio_write(0x508, 4, 1)
    checksum = new.latest(make_tag(ReportKind.CHECKSUM, 0))
    assert checksum is not None and checksum.value == (1 << 32) | 0xAB and checksum.seq == 1
    assert new.report_count == 2
    port.pio_write(0x50C, 1, 0)
    assert DebugPortState.from_dict(port.save().to_dict()).exit_code == 0


def test_debug_port_state_validation() -> None:
    port = DebugPort()
    report(port, 1, 2)
    good = port.save().to_dict()
    for data, message in [
        ({**good, "version": 2}, "version 2"),
        ({**good, "exit_code": 256}, "exit_code must be"),
        ({**good, "next_seq": -1}, "next_seq must be"),
        ({**good, "reports": [[5, 1, 2]]}, "seq 5 >= next_seq 1"),
        ({**good, "reports": [[0, 1]]}, "list of 3 integers"),
        ({**good, "latches": [[0, 1, 2], [0, 3, 4]]}, "two latches"),
        ({**good, "latest": "no"}, "must be a list"),
        ({"version": 1}, "missing keys"),
    ]:
        with pytest.raises(DebugPortStateError, match=message):
            DebugPortState.from_dict(data)


def test_devices_on_one_bus() -> None:
    bus = IoBus()
    uart, console, _ = make_uart()
    debug = DebugPort()
    bus.register(uart.base, uart.length, uart, "com1")
    bus.register(debug.base, debug.length, debug, "debug")
    for byte in b"ok":
        bus.write(COM1_BASE, 1, byte)
    bus.write(0x500, 4, make_tag(ReportKind.HELLO, 0))
    bus.write(0x504, 4, 42)
    bus.write(0x508, 4, 0)
    bus.write(0x50C, 1, 0)
    assert console.data == b"ok"
    assert bus.read(COM1_BASE + u.LSR, 1) == 0x60
    assert debug.exit_code == 0 and debug.reports[0].value == 42


@needs_kvm
def test_machine_routes_guest_mmio_to_registered_devices(tmp_path: Path) -> None:
    """A flat 32-bit guest loads from a device, stores the value plus one back, stores what an
    unclaimed address reads, and exits through the debug port."""
    guest = tmp_path / "mmio.bin"
    guest.write_bytes(
        bytes.fromhex(
            "a1000000d0"  # mov eax, [0xd0000000]
            "40"  # inc eax
            "a3040000d0"  # mov [0xd0000004], eax
            "a1001000d0"  # mov eax, [0xd0001000]   (no device there)
            "a3080000d0"  # mov [0xd0000008], eax
            "66ba0c05"  # mov dx, 0x50c
            "b007"  # mov al, 7
            "ee"  # out dx, al
            "ebfe"  # jmp $
        )
    )
    machine = Machine.create(MachineConfig(memory=16 * MiB, guest=str(guest), serial="none"))
    device = MmioRecorder(0x4100)
    try:
        machine.mmio.register(0xD000_0000, 0x100, device, "test")
        machine.start()
        assert machine.wait(20), "the guest did not exit"
        assert machine.exit_code == 7
    finally:
        machine.close()
    assert device.calls == [
        ("r", 0xD000_0000, 4, 0),
        ("w", 0xD000_0004, 4, 0x4101),
        ("w", 0xD000_0008, 4, 0xFFFF_FFFF),
    ]


# -- the state records formatted directly (saved in a hand-off's pause) --------------------


@st.composite
def uart_states(draw: st.DrawFn) -> UartState:
    fcr = draw(st.integers(0, 0xFF)) & u._FCR_KEPT
    capacity = u.FIFO_SIZE if fcr & u.FCR_ENABLE else 1
    return UartState(
        divisor=draw(st.integers(0, 0xFFFF)),
        ier=draw(st.integers(0, 0xFF)) & u.IER_MASK,
        lcr=draw(st.integers(0, 0xFF)),
        mcr=draw(st.integers(0, 0xFF)) & u.MCR_MASK,
        scr=draw(st.integers(0, 0xFF)),
        fcr=fcr,
        lsr_errors=draw(st.integers(0, 0xFF)) & u.LSR_ERRORS,
        msr=draw(st.integers(0, 0xFF)),
        thr_ipending=draw(st.booleans()),
        rx_fifo=draw(st.binary(max_size=capacity)),
        tx_fifo=draw(st.binary(max_size=capacity)),
        bytes_written=draw(st.integers(0, (1 << 64) - 1)),
    )


@settings(max_examples=200, deadline=None)
@given(uart_states())
def test_uart_state_json_is_the_records_bytes(state: UartState) -> None:
    """What a hand-off saves is what the generic encoder (and intrahost 0.1) writes."""
    uart, _, _ = make_uart()
    uart.pause()
    uart.restore(state)
    assert uart.state_json() == uart.save().to_json() == state.to_json()
    assert uart.persist().save_parts() == [("", state.to_json())]


def test_uart_state_json_requires_pause() -> None:
    uart, _, _ = make_uart()
    with pytest.raises(UartStateError, match=r"call pause\(\) first"):
        uart.state_json()


_PORT_OPS = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from([0x500, 0x504, 0x508]), st.integers(0, 0xFFFF)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_PORT_OPS, st.none() | st.integers(0, 0xFF))
def test_debug_port_state_json_is_the_records_bytes(
    ops: list[tuple[int, int, int]], exit_code: int | None
) -> None:
    """What a hand-off saves is what the generic encoder (and intrahost 0.1) writes, for
    reports, latest values and half-written latches of several vCPUs."""
    current = threading.local()
    port = DebugPort(current_vcpu=lambda: int(getattr(current, "index", 0)))
    for vcpu, offset, value in ops:
        current.index = vcpu
        port.pio_write(offset, 4, make_tag(value & 7, vcpu) if offset == 0x500 else value << 16)
    if exit_code is not None:
        port.pio_write(0x50C, 1, exit_code)
    assert port.state_json() == port.save().to_json()
    assert DebugPortState.from_dict(json.loads(port.state_json())) == port.save()
    assert port.persist().save_parts() == [("", port.save().to_json())]
