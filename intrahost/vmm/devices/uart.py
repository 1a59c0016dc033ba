"""A 16550A-compatible UART (its host consoles are in :mod:`.console`).

Registers (offset from the base, COM1 = 0x3F8, IRQ 4)::

    +0  RBR (read) / THR (write)        DLL when LCR.DLAB = 1
    +1  IER                             DLM when LCR.DLAB = 1
    +2  IIR (read) / FCR (write)
    +3  LCR     +4  MCR     +5  LSR     +6  MSR     +7  SCR

Transmission. A byte written to THR is appended to the TX FIFO; the FIFO is drained to the
:class:`Console` by a writer. By default (``immediate=True``) the vCPU thread that wrote THR
drains it at once, so THR is empty again before the ``out`` instruction completes. Bytes stay
in the FIFO (THR not empty, LSR.THRE clear) when draining is paused (:meth:`Uart16550.pause`),
when ``immediate=False`` (the writer thread started by :meth:`Uart16550.start`, or
:meth:`Uart16550.flush`, drains them), or when the console pushes back (a pty whose reader is
slow). A console write never blocks (see :mod:`.console`): a vCPU stuck in it could not be
paused. The FIFO is therefore real state: :meth:`Uart16550.save` captures the bytes not yet
written, and :meth:`Uart16550.restore` on a new UART (with any console) writes exactly those.

Draining happens under the device lock, so once :meth:`Uart16550.pause` returns no byte is
half-way to the console: each byte is either written (and gone from the FIFO) or still queued.

Interrupts. The ``irq(level)`` callback is called with True when an interrupt condition
becomes pending and with False when none is pending any more, always under the device lock
(so edges are reported in order); it must not call back into the UART. A THR write that
re-arms "THR empty" produces a False/True pulse, as the hardware's interrupt output does. The
interrupt output is not gated by MCR.OUT2 (as in QEMU).

Simplifications of a virtual line: the divisor and LCR framing are stored but do not change
timing or mask data bits; a character timeout (IIR 0xC) is reported as soon as received data
sits below the FIFO trigger level; there are no parity/framing errors or breaks. RX FIFO
overruns set LSR.OE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from intrahost.closing import Closeable
from intrahost.vmm.devices.console import Console
from intrahost.vmm.persist import JsonRecord, RecordState, StateFormatError

log = logging.getLogger(__name__)

COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_LENGTH = 8
FIFO_SIZE = 16

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits.
IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status
IER_MS = 0x08  # modem status
IER_MASK = 0x0F

# IIR values (bits 0..3) and the FIFO-enabled bits.
IIR_NO_INT = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_TIMEOUT = 0x0C
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO = 0xC0

# FCR bits.
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0
_FCR_KEPT = FCR_ENABLE | FCR_DMA | FCR_TRIGGER
_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERROR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_INPUTS = 0xF0

#: Modem inputs of a virtual line outside loopback: carrier, data set ready, clear to send.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

#: Reset values, as QEMU's 16550A (9600 baud divisor).
RESET_DIVISOR = 12

#: How long the writer thread waits before retrying a console that pushed back.
RETRY_INTERVAL = 0.005

#: How long the reader thread blocks in one console read (also its stop latency).
READ_POLL_INTERVAL = 0.1

STATE_VERSION = 1


class UartStateError(StateFormatError):
    """A UART state record is malformed (or save() was called with the UART's output still
    draining: the record would not be consistent)."""


# -- state record ------------------------------------------------------------------------


@dataclass(frozen=True)
class UartState(JsonRecord, label="UART state", error=UartStateError, version=STATE_VERSION):
    """Everything a UART holds; :meth:`Uart16550.restore` continues from it exactly.

    ``tx_fifo`` holds the bytes the guest wrote that no console has received yet, oldest
    first; the restoring UART writes them. ``lsr_errors`` holds the sticky LSR error bits
    (OE, PE, FE, BI); ``msr`` includes the delta bits the guest has not read yet;
    ``thr_ipending`` is the "THR empty" interrupt latch. The other LSR bits and the interrupt
    level follow from these. ``bytes_written`` counts console bytes over the guest's life.
    The JSON form (:meth:`to_dict`) holds the FIFOs as lowercase hex strings; a field added
    later needs a default, so that a record without it still reads.
    """

    divisor: int
    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    lsr_errors: int
    msr: int
    thr_ipending: bool
    rx_fifo: bytes
    tx_fifo: bytes
    bytes_written: int

    def __post_init__(self) -> None:
        _validate(self)


def _validate(state: UartState) -> None:
    def uint(name: str, maximum: int) -> None:
        value = getattr(state, name)
        if type(value) is not int or not 0 <= value <= maximum:
            raise UartStateError(
                f"UART state: {name} must be an integer in 0..{maximum:#x}, got {value!r}"
            )

    uint("divisor", 0xFFFF)
    for name in ("ier", "lcr", "mcr", "scr", "fcr", "lsr_errors", "msr"):
        uint(name, 0xFF)
    uint("bytes_written", (1 << 64) - 1)
    if state.ier & ~IER_MASK or state.mcr & ~MCR_MASK:
        raise UartStateError("UART state: ier or mcr has bits a 16550A cannot hold")
    if state.fcr & ~_FCR_KEPT or state.lsr_errors & ~LSR_ERRORS:
        raise UartStateError("UART state: fcr or lsr_errors has bits a 16550A cannot hold")
    if type(state.thr_ipending) is not bool:
        raise UartStateError("UART state: thr_ipending must be a bool")
    for name in ("rx_fifo", "tx_fifo"):
        fifo = getattr(state, name)
        if type(fifo) is not bytes:
            raise UartStateError(f"UART state: {name} must be bytes")
        capacity = FIFO_SIZE if state.fcr & FCR_ENABLE else 1
        if len(fifo) > capacity:
            raise UartStateError(
                f"UART state: {name} holds {len(fifo)} bytes, more than the {capacity} "
                f"the FIFO setting allows"
            )


#: ``UartState.to_json()``'s form (keys sorted, compact), for :meth:`Uart16550.state_json`.
_STATE_JSON = (
    '{"bytes_written":%d,"divisor":%d,"fcr":%d,"ier":%d,"lcr":%d,"lsr_errors":%d,"mcr":%d,'
    '"msr":%d,"rx_fifo":"%s","scr":%d,"thr_ipending":%s,"tx_fifo":"%s","version":'
    + str(STATE_VERSION)
    + "}"
)


# -- the device --------------------------------------------------------------------------


class Uart16550(Closeable):
    """A 16550A UART on the I/O bus. Thread-safe. Owns (and closes) its console."""

    def __init__(
        self,
        console: Console,
        irq: Callable[[bool], None] | None = None,
        *,
        base: int = COM1_BASE,
        immediate: bool = True,
    ) -> None:
        self.base = base
        self.console = console
        self.immediate = immediate
        self._irq = irq
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Registers.
        self._divisor = RESET_DIVISOR
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fcr = 0
        self._lsr_errors = 0
        self._msr = MSR_CONNECTED
        self._thr_ipending = False
        self._rx: deque[int] = deque()
        self._tx = bytearray()
        self._irq_level = False
        # Host-side control and statistics.
        self._paused = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._bytes_written = 0
        self.tx_dropped = 0  # THR writes that found the FIFO full
        self.tx_discarded = 0  # bytes thrown away because the console failed
        self.rx_overruns = 0  # received bytes lost to a full RX FIFO
        self._console_failed = False

    @property
    def length(self) -> int:
        """How many ports the device occupies on the bus."""
        return UART_LENGTH

    # -- guest side ----------------------------------------------------------------------

    def pio_read(self, port: int, size: int) -> int:
        # A wider access reads consecutive registers, little-endian.
        value = 0
        for i in range(size):
            offset = port + i - self.base
            byte = self.read_register(offset) if 0 <= offset < UART_LENGTH else 0xFF
            value |= byte << (8 * i)
        return value

    def pio_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            offset = port + i - self.base
            if 0 <= offset < UART_LENGTH:
                self.write_register(offset, (value >> (8 * i)) & 0xFF)

    def read_register(self, offset: int) -> int:
        """Read the register at ``offset`` (0..7) with its side effects."""
        with self._lock:
            dlab = self._lcr & LCR_DLAB
            if offset == RBR:
                if dlab:
                    return self._divisor & 0xFF
                value = self._rx.popleft() if self._rx else 0
                if len(self._rx) == self._capacity() - 1:
                    self._cond.notify_all()  # room again: wake a reader waiting for it
            elif offset == IER:
                if dlab:
                    return self._divisor >> 8
                return self._ier
            elif offset == IIR:
                value = self._iir()
                if value & 0x0F == IIR_THRE:
                    self._thr_ipending = False  # reading IIR acknowledges "THR empty"
            elif offset == LCR:
                return self._lcr
            elif offset == MCR:
                return self._mcr
            elif offset == LSR:
                value = self._lsr()
                self._lsr_errors = 0
            elif offset == MSR:
                value = self._msr
                self._msr &= ~MSR_DELTAS & 0xFF
            elif offset == SCR:
                return self._scr
            else:
                raise ValueError(f"UART register offset {offset} is not in 0..7")
            self._update_irq()
            return value

    def write_register(self, offset: int, value: int) -> None:
        """Write ``value`` (one byte) to the register at ``offset`` (0..7)."""
        value &= 0xFF
        with self._lock:
            dlab = self._lcr & LCR_DLAB
            if offset == THR:
                if dlab:
                    self._divisor = (self._divisor & 0xFF00) | value
                else:
                    self._transmit(value)
            elif offset == IER:
                if dlab:
                    self._divisor = (self._divisor & 0x00FF) | (value << 8)
                else:
                    enabling_thre = value & IER_THRE and not self._ier & IER_THRE
                    self._ier = value & IER_MASK
                    if enabling_thre and not self._tx:
                        self._thr_ipending = True  # 16550: enabling ETBEI with THR empty
            elif offset == FCR:
                self._write_fcr(value)
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value & MCR_MASK
                self._set_modem_inputs(self._modem_inputs())
            elif offset == SCR:
                self._scr = value
            elif offset in (LSR, MSR):
                log.debug(
                    "UART %#x: write %#x to read-only register %d ignored", self.base, value, offset
                )
            else:
                raise ValueError(f"UART register offset {offset} is not in 0..7")
            self._update_irq()

    # -- register helpers (lock held) ----------------------------------------------------

    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled() else 1

    def _lsr(self) -> int:
        value = self._lsr_errors
        if self._rx:
            value |= LSR_DR
        if not self._tx:
            value |= LSR_THRE | LSR_TEMT
        return value

    def _iir(self) -> int:
        fifo_bits = IIR_FIFO if self._fifo_enabled() else 0
        if self._ier & IER_RLS and self._lsr_errors:
            ident = IIR_RLS
        elif self._ier & IER_RDA and self._rx:
            trigger = _TRIGGER_LEVELS[self._fcr >> 6]
            below = self._fifo_enabled() and len(self._rx) < trigger
            ident = IIR_TIMEOUT if below else IIR_RDA
        elif self._ier & IER_THRE and self._thr_ipending:
            ident = IIR_THRE
        elif self._ier & IER_MS and self._msr & MSR_DELTAS:
            ident = IIR_MS
        else:
            ident = IIR_NO_INT
        return ident | fifo_bits

    def _update_irq(self) -> None:
        level = not self._iir() & IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            if self._irq is not None:
                self._irq(level)

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE:
            # Switching the FIFOs on or off empties both, as on the hardware.
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        if value & FCR_CLEAR_TX and self._tx:
            log.debug("UART %#x: guest cleared %d queued TX bytes", self.base, len(self._tx))
            self._tx.clear()
            self._thr_ipending = True
        self._fcr = value & _FCR_KEPT

    def _modem_inputs(self) -> int:
        if not self._mcr & MCR_LOOP:
            return MSR_CONNECTED
        mcr = self._mcr
        inputs = 0
        if mcr & MCR_RTS:
            inputs |= MSR_CTS
        if mcr & MCR_DTR:
            inputs |= MSR_DSR
        if mcr & MCR_OUT1:
            inputs |= MSR_RI
        if mcr & MCR_OUT2:
            inputs |= MSR_DCD
        return inputs

    def _set_modem_inputs(self, inputs: int) -> None:
        old = self._msr & MSR_INPUTS
        changed = old ^ inputs
        deltas = self._msr & MSR_DELTAS
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if old & MSR_RI and not inputs & MSR_RI:
            deltas |= MSR_TERI
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        self._msr = inputs | deltas

    def _transmit(self, byte: int) -> None:
        # The THR write acknowledges "THR empty"; report the drop before the byte leaves, so
        # re-arming it below is a fresh edge.
        self._thr_ipending = False
        if self._mcr & MCR_LOOP:
            self._update_irq()
            self._push_rx(bytes([byte]))  # loopback: straight to the receiver
            self._thr_ipending = True
            return
        if len(self._tx) >= self._capacity():
            self.tx_dropped += 1
            log.debug("UART %#x: THR written while the TX FIFO was full; byte dropped", self.base)
            return
        self._tx.append(byte)
        self._update_irq()
        if self.immediate and not self._paused:
            self._drain()
        else:
            self._cond.notify_all()

    def _push_rx(self, data: bytes) -> int:
        room = self._capacity() - len(self._rx)
        accepted = data[: max(room, 0)]
        self._rx.extend(accepted)
        lost = len(data) - len(accepted)
        if lost:
            self._lsr_errors |= LSR_OE
            self.rx_overruns += lost
        return len(accepted)

    def _drain(self) -> int:
        """Write queued TX bytes to the console (lock held); return how many were written."""
        if not self._tx or self._paused:
            return 0
        data = bytes(self._tx)
        if self._console_failed:
            self.tx_discarded += len(data)
            written = len(data)
        else:
            try:
                written = self.console.write(data)
            except (OSError, ValueError) as error:  # ValueError: a closed Python stream
                # A broken console must not stop the guest: drop its output, say so once.
                log.warning(
                    "UART %#x: console %s failed (%s); discarding its output from now on",
                    self.base,
                    self.console.description,
                    error,
                )
                self._console_failed = True
                self.tx_discarded += len(data)
                written = len(data)
            else:
                self._bytes_written += written
        del self._tx[:written]
        if written and not self._tx:
            self._thr_ipending = True
            self._update_irq()
        if self._tx:
            self._cond.notify_all()  # the writer thread retries a console that pushed back
        return written

    # -- host side -----------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Deliver ``data`` from the console to the guest; return how many bytes fit.

        Bytes beyond the RX FIFO's room are lost and set LSR.OE, as on the hardware. In
        loopback mode the serial input is disconnected and ``data`` is dropped.
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            accepted = self._push_rx(data)
            self._update_irq()
            return accepted

    def flush(self, timeout: float = 0.0) -> int:
        """Drain the TX FIFO to the console now; return how many bytes were written.

        Retries a console that pushes back until the FIFO is empty or ``timeout`` seconds
        pass. Writes nothing while the UART is paused.
        """
        deadline = time.monotonic() + timeout
        total = 0
        with self._lock:
            while True:
                total += self._drain()
                if not self._tx or self._paused or time.monotonic() >= deadline:
                    return total
                self._cond.wait(RETRY_INTERVAL)

    def pause(self) -> None:
        """Stop draining output and taking console input; queued bytes stay queued.

        When this returns, no byte is being written: :meth:`save` sees every byte either
        written or in the FIFO.
        """
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`; queued output is drained at once (immediate mode)."""
        with self._lock:
            self._paused = False
            if self.immediate:
                self._drain()
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    @property
    def bytes_written(self) -> int:
        """Bytes the console has taken, over the guest's life (carried by save/restore)."""
        with self._lock:
            return self._bytes_written

    @property
    def console_dropped(self) -> int:
        """Output bytes that never reached a target on this VMM: dropped by the console (its
        target was full) or discarded after it failed."""
        with self._lock:
            return self.console.dropped + self.tx_discarded

    @property
    def tx_pending(self) -> bytes:
        """Output the guest wrote that the console has not taken yet."""
        with self._lock:
            return bytes(self._tx)

    @property
    def irq_level(self) -> bool:
        """The interrupt level last reported through ``irq``."""
        with self._lock:
            return self._irq_level

    def start(self) -> None:
        """Start the writer thread and, if the console has input, the reader thread."""
        with self._lock:
            if self._threads:
                return
            self._stopping = False
            name = f"uart-{self.base:#x}"
            self._threads.append(
                threading.Thread(target=self._writer_loop, name=f"{name}-tx", daemon=True)
            )
            if self.console.has_input:
                self._threads.append(
                    threading.Thread(target=self._reader_loop, name=f"{name}-rx", daemon=True)
                )
            threads = list(self._threads)
        for thread in threads:
            thread.start()

    def close(self, flush_timeout: float = 1.0) -> None:
        """Stop the threads and close the console.

        Unless paused, queued output is flushed first (for up to ``flush_timeout`` seconds).
        A paused UART keeps its queue unwritten: after a hand-off those bytes belong to the
        new owner.
        """
        self.flush(flush_timeout)
        with self._lock:
            self._stopping = True
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()
        try:
            self.console.close()
        except OSError as error:
            log.warning(
                "UART %#x: closing console %s: %s", self.base, self.console.description, error
            )

    def _writer_loop(self) -> None:
        with self._lock:
            while not self._stopping:
                if self._tx and not self._paused:
                    if self._drain() == 0:
                        self._cond.wait(RETRY_INTERVAL)  # pushed back: retry shortly
                else:
                    self._cond.wait()

    def _reader_loop(self) -> None:
        held = b""  # read from the console, not yet accepted by the guest-visible FIFO
        while True:
            with self._lock:
                # Take input only while running, so bytes never land in the FIFO after a
                # pause()/save(); wait for room rather than overrunning the FIFO.
                while not self._stopping and (self._paused or len(self._rx) >= self._capacity()):
                    self._cond.wait(READ_POLL_INTERVAL)
                if self._stopping:
                    if held:
                        log.debug("UART %#x: %d input bytes dropped at close", self.base, len(held))
                    return
                if held:
                    if self._mcr & MCR_LOOP:
                        held = b""  # loopback disconnects the serial input
                    else:
                        accepted = self._push_rx(held[: self._capacity() - len(self._rx)])
                        held = held[accepted:]
                        self._update_irq()
                    continue
                room = self._capacity() - len(self._rx)
            try:
                held = self.console.read_input(room, READ_POLL_INTERVAL)
            except OSError as error:
                log.warning("UART %#x: console input failed (%s); input stops", self.base, error)
                return

    # -- state ---------------------------------------------------------------------------

    def persist(self) -> RecordState[UartState]:
        """This device's state component (see ``intrahost.vmm.persist``)."""
        return RecordState(UartState, self.save, self.restore, save_json=self.state_json)

    def _check_saveable(self) -> None:
        """(Lock held.)"""
        if not self._paused:
            raise UartStateError(
                "UART state saved while output is still draining: call pause() first, "
                "or bytes written after the snapshot would be written twice"
            )

    def save(self) -> UartState:
        """Snapshot the UART. It must be paused (:meth:`pause`) and the vCPUs stopped."""
        with self._lock:
            self._check_saveable()
            return UartState(
                divisor=self._divisor,
                ier=self._ier,
                lcr=self._lcr,
                mcr=self._mcr,
                scr=self._scr,
                fcr=self._fcr,
                lsr_errors=self._lsr_errors,
                msr=self._msr,
                thr_ipending=self._thr_ipending,
                rx_fifo=bytes(self._rx),
                tx_fifo=bytes(self._tx),
                bytes_written=self._bytes_written,
            )

    def state_json(self) -> bytes:
        """``self.save().to_json()``, byte for byte, formatted directly (it is saved in a
        hand-off's pause)."""
        with self._lock:
            self._check_saveable()
            return (
                _STATE_JSON
                % (
                    self._bytes_written,
                    self._divisor,
                    self._fcr,
                    self._ier,
                    self._lcr,
                    self._lsr_errors,
                    self._mcr,
                    self._msr,
                    bytes(self._rx).hex(),
                    self._scr,
                    "true" if self._thr_ipending else "false",
                    self._tx.hex(),
                )
            ).encode()

    def restore(self, state: UartState) -> None:
        """Continue from ``state``: registers, FIFOs, pending interrupts, unwritten output.

        The restored interrupt level is reported through ``irq`` so the new owner's line
        matches (the saved interrupt controller carries the same level, so no spurious edge).
        Unless the UART is paused, the restored TX bytes are written to this UART's console.
        """
        with self._lock:
            self._divisor = state.divisor
            self._ier = state.ier
            self._lcr = state.lcr
            self._mcr = state.mcr
            self._scr = state.scr
            self._fcr = state.fcr
            self._lsr_errors = state.lsr_errors
            self._msr = state.msr
            self._thr_ipending = state.thr_ipending
            self._rx = deque(state.rx_fifo)
            self._tx = bytearray(state.tx_fifo)
            self._bytes_written = state.bytes_written
            self._irq_level = not self._iir() & IIR_NO_INT
            if self._irq is not None:
                self._irq(self._irq_level)
            if self.immediate:
                self._drain()
            self._cond.notify_all()
