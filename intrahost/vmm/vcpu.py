"""One thread per vCPU, and parking them all outside KVM_RUN.

Pausing works in two steps, for every vCPU at once:

1. set ``kvm_run.immediate_exit`` and send the vCPU thread a signal. A thread inside KVM_RUN
   returns with EINTR; a thread busy in userspace (handling an exit) will return from its next
   KVM_RUN at once, because of ``immediate_exit``.
2. the thread sees the pause request and parks: it blocks on a lock of its own (its gate),
   and the last one to park wakes the pauser — one wake-up for the group.

That next KVM_RUN matters: KVM completes a pending I/O or MMIO read (copies the data userspace
put in kvm_run into the guest's register) only when KVM_RUN is entered again. Entering it with
``immediate_exit`` set completes the instruction and returns at once, so a parked vCPU's
state is whole and can be exported.

``pause()`` returns only when every vCPU is parked; ``resume()`` clears ``immediate_exit``
and releases them. A vCPU busy in userspace cannot be interrupted, so a pause may time out
(an exit handler that blocks); it is then undone: the pause request and ``immediate_exit``
are cleared and the vCPUs that did park are released, so the group runs as before the call.

The kick is SIGUSR1 with a no-op handler. Python installs signal handlers only from the main
thread, so this module does not do it on import: :meth:`VcpuGroup.start` installs it when it
runs on the main thread, and a process that may start vCPUs on another thread (a hand-off's
destination, a source taking an SEV guest back) calls :func:`install_kick_handler` from its
main thread at start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import signal
import threading
import time
from collections.abc import Callable
from enum import Enum

from intrahost.errors import IntrahostError
from intrahost.kvm import Interrupted, KvmError, MpState, PortOut, Vcpu, VcpuExit, Vm

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1


class KickHandlerMissing(IntrahostError):
    """vCPUs were started on a thread other than the main one before the kick signal's
    handler was installed."""


class PauseTimeout(IntrahostError):
    """Some vCPU did not park in time; the pause was undone (the guest runs as before)."""


def kick_handler_installed() -> bool:
    """Whether the kick signal is caught (neither default nor ignored)."""
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def install_kick_handler() -> None:
    """Install the no-op handler whose delivery interrupts KVM_RUN.

    The signal must be caught, not ignored: an ignored signal does not interrupt the
    syscall. Python installs handlers only from the main thread: call this there, at
    start-up, in a process that may start vCPUs on another thread. Harmless when the handler
    is already installed; raises :class:`KickHandlerMissing` when it is not and this is not
    the main thread.
    """
    if kick_handler_installed():
        return
    if threading.current_thread() is not threading.main_thread():
        raise KickHandlerMissing(
            f"vCPU threads need a handler for the kick signal ({KICK_SIGNAL.name}), and Python "
            "installs signal handlers only from the main thread: call "
            "intrahost.vmm.vcpu.install_kick_handler() from the main thread at start-up, "
            "before vCPUs are started on another thread"
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's only job is to interrupt KVM_RUN."""


class RunState(Enum):
    RUNNING = "running"
    PARKED = "parked"
    STOPPED = "stopped"


#: Handles one exit; returns False to stop this vCPU (the guest asked to, or it failed).
ExitHandler = Callable[[Vcpu, VcpuExit], bool]


class RunStub:
    """Pages outside guest memory on which a never-run vCPU runs once, so that its first
    KVM_RUN — slow: KVM sets up the vCPU's MMU and loads it on a CPU for the first time,
    0.05-0.2 ms here — is not paid after a hand-off's import, in the blackout.

    The pages are a memory slot of their own, below the TSS pages under 4 GiB, where the
    guest has no RAM: code (``out %al, $0x80``), a GDT, a TSS whose I/O bitmap allows the
    port, and page tables mapping the slot. The vCPU runs the code in 64-bit mode at CPL3 —
    natively: real mode and CPL0 would be emulated on a host without unrestricted guests —,
    exits to userspace once, and is entered again with ``immediate_exit``, which completes the
    OUT; it is then as any parked vCPU. Nothing of the stub remains: the import sets every
    register, and the slot is deleted (:meth:`close`) before the guest can run. Guest memory
    is never written.

    Ordering: the CPUID must be set before (KVM accepts only an identical table after a
    vCPU ran). Each vCPU must be run by the thread that will run it afterwards: KVM_RUN from
    a new thread waits for an RCU grace period (milliseconds) — :meth:`VcpuGroup.start`'s
    ``first_run`` does that.
    """

    SLOT = 31
    BASE = 0xFFC0_0000
    SIZE = 0x8000
    PORT = 0x80
    _CODE = bytes([0xE6, PORT, 0xF4])  # out %al, $0x80; hlt (never reached)
    _GDT, _TSS, _PML4 = 0x1000, 0x2000, 0x3000  # then PDPT, PD, PT
    _TSS_LIMIT = 104 + 0x400 // 8  # the TSS, then an I/O bitmap for ports 0-0x3FF
    _UCODE, _UDATA, _TR = 0x20 | 3, 0x18 | 3, 0x28

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._page = mmap.mmap(-1, self.SIZE)
        self._build(self._page)
        view = ctypes.c_char.from_buffer(self._page)
        self._address = ctypes.addressof(view)
        del view  # (an exported buffer would keep the mapping from closing)
        try:
            vm.set_user_memory_region(self.SLOT, self.BASE, self.SIZE, self._address)
        except BaseException:
            self._page.close()
            raise

    @classmethod
    def _build(cls, page: mmap.mmap) -> None:
        base = cls.BASE
        page[0 : len(cls._CODE)] = cls._CODE
        gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF]
        tss = base + cls._TSS
        gdt += [
            (cls._TSS_LIMIT & 0xFFFF)
            | (tss & 0xFFFFFF) << 16
            | 0x8B << 40
            | (tss >> 24 & 0xFF) << 56,
            tss >> 32,
        ]
        for i, word in enumerate(gdt):
            page[cls._GDT + 8 * i : cls._GDT + 8 * i + 8] = word.to_bytes(8, "little")
        page[cls._TSS + 102 : cls._TSS + 104] = (104).to_bytes(2, "little")  # bitmap offset
        page[cls._TSS + cls._TSS_LIMIT] = 0xFF
        # 4 KiB pages, identity-mapped, user-accessible: PML4 -> PDPT -> PD -> PT.
        tables = [base + cls._PML4 + 0x1000 * i for i in range(4)]
        indices = [base >> 39 & 511, base >> 30 & 511, base >> 21 & 511]
        for level in range(3):
            at = cls._PML4 + 0x1000 * level + 8 * indices[level]
            page[at : at + 8] = (tables[level + 1] | 7).to_bytes(8, "little")
        for i in range(cls.SIZE // 0x1000):
            at = cls._PML4 + 0x3000 + 8 * ((base >> 12 & 511) + i)
            page[at : at + 8] = (base + 0x1000 * i | 7).to_bytes(8, "little")

    def _enter_user_mode(self, vcpu: Vcpu) -> None:
        sregs = vcpu.get_sregs()
        for name in ("ds", "es", "fs", "gs", "ss"):
            seg = getattr(sregs, name)
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, self._UDATA, 3
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.unusable = 1, 3, 1, 1, 0, 1, 0
        cs = sregs.cs
        cs.base, cs.limit, cs.selector, cs.type = 0, 0xFFFFFFFF, self._UCODE, 11
        cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g, cs.unusable = 1, 3, 0, 1, 1, 1, 0
        tr = sregs.tr
        tr.base, tr.limit, tr.selector, tr.type = (
            self.BASE + self._TSS,
            self._TSS_LIMIT,
            self._TR,
            11,
        )
        tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.unusable = 1, 0, 0, 0, 0, 0, 0
        sregs.gdt.base, sregs.gdt.limit = self.BASE + self._GDT, 7 * 8 - 1
        sregs.idt.base, sregs.idt.limit = 0, 0
        sregs.cr0 = 0x8001_0033  # PG WP NE ET MP PE
        sregs.cr3 = self.BASE + self._PML4
        sregs.cr4 = 0x20  # PAE
        sregs.efer = 0x500  # LMA LME
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsp = self.BASE, 0x3002, 0  # IOPL 3, IF 0
        vcpu.set_regs(regs)
        # An application processor waits for INIT/SIPI in KVM_RUN: make it runnable (the
        # import sets the real MP state).
        vcpu.set_mp_state(MpState.RUNNABLE)

    def run(self, index: int, vcpu: Vcpu) -> None:
        """Run ``vcpu`` once on the stub (from the thread that will run it)."""
        self._enter_user_mode(vcpu)
        run = vcpu.kvm_run
        exit_ = vcpu.run()
        run.immediate_exit = 1
        try:
            vcpu.run()  # completes the OUT, returns at once
        finally:
            run.immediate_exit = 0
        if not (isinstance(exit_, PortOut) and exit_.port == self.PORT):
            log.warning("vCPU %d: unexpected exit on the run stub: %r", index, exit_)

    def close(self) -> None:
        if not self._page.closed:
            with contextlib.suppress(KvmError):  # the VM may be gone
                self.vm.set_user_memory_region(self.SLOT, self.BASE, 0, self._address)
            self._page.close()

    def __enter__(self) -> RunStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VcpuGroup:
    """The vCPU threads of one VM, paused and resumed together."""

    def __init__(self, vcpus: list[Vcpu], handle_exit: ExitHandler) -> None:
        """A platform that must wrap KVM_RUN (the SEV model) does so in its own Vcpu class."""
        self.vcpus = vcpus
        self._handle_exit = handle_exit
        #: Guards the flags, the states and ``_waiters``; held only for short sections.
        self._lock = threading.Lock()
        #: One per vCPU, locked while it is closed: a parked thread blocks acquiring its own
        #: gate, :meth:`_release` opens the gates of parked vCPUs (and only theirs, so each
        #: release meets one park), and the thread that passes it holds it — closed for its
        #: next park.
        self._gates = [threading.Lock() for _ in vcpus]
        for gate in self._gates:
            gate.acquire()
        #: Released (lock held) by whichever thread leaves no vCPU running: a pauser waits on
        #: its own, one wake-up for the whole group.
        self._waiters: list[threading.Lock] = []
        self._pause_requested = False
        self._stop_requested = False
        self._states = [RunState.PARKED] * len(vcpus)
        self._threads: list[threading.Thread] = []
        self._first_run: Callable[[int, Vcpu], None] | None = None
        self.exits = [0] * len(vcpus)
        self.errors: list[BaseException] = []
        #: Called once (from a vCPU thread) when any vCPU stops on its own.
        self.on_stop: Callable[[], None] | None = None

    # --- control (any thread) ------------------------------------------------------------------

    def start(
        self, paused: bool = False, first_run: Callable[[int, Vcpu], None] | None = None
    ) -> None:
        """Start one thread per vCPU; with ``paused`` they park before their first KVM_RUN.
        ``first_run(index, vcpu)`` (with ``paused``): what each thread does with its vCPU
        before it parks (:meth:`RunStub.run`); returns when every thread has done it. A
        failure there is logged: the vCPU parks all the same.

        Installs the kick handler first when on the main thread; elsewhere it must have been
        installed (:func:`install_kick_handler`), or this raises :class:`KickHandlerMissing`.
        """
        install_kick_handler()
        self._first_run = first_run if paused else None
        with self._lock:
            self._pause_requested = paused
            for v in self.vcpus:
                v.kvm_run.immediate_exit = 0 if paused and first_run else int(paused)
            # Running from now on, not from when each thread gets going: a pause() right
            # after start() must wait for every thread to park — and so must this start()
            # while the threads do their first run (its stub goes away when this returns).
            running = not paused or first_run is not None
            self._states = [RunState.RUNNING if running else RunState.PARKED] * len(self.vcpus)
        for i, _ in enumerate(self.vcpus):
            t = threading.Thread(target=self._loop, args=(i,), name=f"vcpu{i}", daemon=True)
            self._threads.append(t)
            t.start()
        if paused:
            late = self._wait_parked()
            if late:
                raise PauseTimeout(f"vCPU threads {late} did not get going within 5 s")

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU outside KVM_RUN; returns when all are parked.

        Raises :class:`PauseTimeout` if some vCPU has not parked after ``timeout`` seconds
        (one stuck in an exit handler). The pause is then undone under the same lock that saw
        the timeout, so no vCPU parks after it: the request and ``immediate_exit`` are
        cleared and the vCPUs that parked are released, as :meth:`resume` does.
        """
        with self._lock:
            self._pause_requested = True
            for v in self.vcpus:
                v.kvm_run.immediate_exit = 1
        self._kick()
        late = self._wait_parked(timeout, undo=True)
        if late:
            names = ("vCPU " if len(late) == 1 else "vCPUs ") + ", ".join(map(str, late))
            raise PauseTimeout(
                f"{names} did not park within {timeout} s (busy handling an exit: a "
                "device or console that blocks?); the pause was undone"
            )

    def resume(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Clear the pause request and ``immediate_exit``; let parked vCPUs go (lock held)."""
        for v in self.vcpus:
            v.kvm_run.immediate_exit = 0
        self._pause_requested = False
        self._open_gates()

    def _open_gates(self) -> None:
        """Open the gate of every parked vCPU (lock held). Released threads count as running
        from now on, not from when they wake."""
        for i, st in enumerate(self._states):
            if st is RunState.PARKED:
                self._states[i] = RunState.RUNNING
                self._gates[i].release()

    def stop(self, timeout: float = 5.0) -> None:
        """End every vCPU thread (the VM stays intact; state can still be read)."""
        with self._lock:
            self._stop_requested = True
            self._pause_requested = True
            for v in self.vcpus:
                if not v.closed:
                    v.kvm_run.immediate_exit = 1
            self._open_gates()
        self._kick()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def paused(self) -> bool:
        with self._lock:
            return RunState.RUNNING not in self._states

    @property
    def stopped(self) -> bool:
        with self._lock:
            return all(s is RunState.STOPPED for s in self._states)

    def _kick(self) -> None:
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(t.ident, KICK_SIGNAL)

    def _wait_parked(self, timeout: float = 5.0, undo: bool = False) -> list[int]:
        """Wait until no vCPU runs; the ones still running after ``timeout``. With ``undo``,
        a timeout undoes the pause (:meth:`_release`) under the lock that saw it.

        One wake-up for the group: the thread that leaves no vCPU running releases
        ``_waiters``. Every 50 ms without it, the vCPUs are kicked again (a kick can land
        between two KVM_RUNs).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if RunState.RUNNING not in self._states:
                return []
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        while True:
            left = deadline - time.monotonic()
            if left > 0 and waiter.acquire(timeout=min(left, 0.05)):
                return []
            with self._lock:
                running = [i for i, s in enumerate(self._states) if s is RunState.RUNNING]
                if not running:
                    return []
                if left <= 0:
                    self._waiters.remove(waiter)
                    if undo:
                        self._release()
                    return running
            self._kick()

    def _note_stopped_running(self) -> None:
        """Wake the pauser if no vCPU runs any more (lock held)."""
        if self._waiters and RunState.RUNNING not in self._states:
            for waiter in self._waiters:
                waiter.release()
            self._waiters.clear()

    # --- the vCPU thread -----------------------------------------------------------------------

    def _park(self, i: int) -> bool:
        """Park while a pause is requested; False when the thread must end.

        Marked parked under the lock, then blocked on the vCPU's gate outside it: a release
        between the two leaves the gate open, so the acquire passes at once. A thread that
        passes its gate checks again: a new pause() may have come before it woke.
        """
        gate = self._gates[i]
        while True:
            with self._lock:
                if self._stop_requested:
                    return False
                if not self._pause_requested:
                    return True
                self._states[i] = RunState.PARKED
                self._note_stopped_running()
            gate.acquire()

    def _loop(self, i: int) -> None:
        vcpu = self.vcpus[i]
        stopped_by_guest = False
        try:
            # Started paused (a destination waiting for its state): park before the first
            # KVM_RUN of the guest, so that nothing runs the vCPU before the import.
            if self._first_run is not None:
                try:
                    self._first_run(i, vcpu)
                except KvmError as e:
                    log.warning("vCPU %d: the run before parking failed: %s", i, e)
                vcpu.kvm_run.immediate_exit = 1
            if not self._park(i):
                return
            while True:
                exit_ = vcpu.run()
                if isinstance(exit_, Interrupted):
                    if not self._park(i):
                        break
                    continue
                self.exits[i] += 1
                if not self._handle_exit(vcpu, exit_):
                    stopped_by_guest = True
                    break
        except KvmError as e:
            log.error("vCPU %d stopped: %s", i, e)
            self.errors.append(e)
            stopped_by_guest = True
        except BaseException as e:  # keep the VMM alive; report through errors
            log.exception("vCPU %d crashed", i)
            self.errors.append(e)
            stopped_by_guest = True
        finally:
            with self._lock:
                self._states[i] = RunState.STOPPED
                self._note_stopped_running()
        if stopped_by_guest and self.on_stop is not None:
            self.on_stop()
