"""Decoded exits: each kind from a real vCPU running a few bytes of real-mode code, the
completion of reads into guest registers, and the rarer kinds decoded from a made-up page."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator

import pytest
from support import needs_kvm

from intrahost.kvm import (
    ExitCompletionError,
    ExitReason,
    FailEntry,
    Halt,
    InternalErrorExit,
    Interrupted,
    Kvm,
    MmioRead,
    MmioWrite,
    OtherExit,
    PortIn,
    PortOut,
    Shutdown,
    SystemEvent,
    Vcpu,
    VcpuExit,
    exits,
    uapi,
)

CODE = 0x1000  # where the guest code is loaded (and starts)
MEMORY = 0x10000  # one slot at 0 .. 64 KiB; everything above is MMIO
MMIO_SEGMENT = 0x2000  # real-mode segment 0x2000 = guest-physical 0x20000


class RealModeVcpu:
    """A VM without an in-kernel irqchip (so ``hlt`` exits to userspace) whose one vCPU is in
    real mode at CS:IP = 0:CODE, with 64 KiB of memory at 0."""

    def __init__(self, kvm: Kvm) -> None:
        self.vm = kvm.create_vm()
        self.vm.set_tss_addr(0xFFFBD000)
        self.memory = mmap.mmap(-1, MEMORY)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.vm.set_user_memory_region(0, 0, MEMORY, address)
        self.vcpu: Vcpu = self.vm.create_vcpu(0, kvm.get_vcpu_mmap_size())
        sregs = self.vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        self.vcpu.set_sregs(sregs)

    def load(self, code: bytes) -> None:
        self.memory[CODE : CODE + len(code)] = code
        regs = uapi.kvm_regs()
        regs.rip, regs.rflags, regs.rsp = CODE, 0x2, 0x8000
        self.vcpu.set_regs(regs)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()


@pytest.fixture
def guest() -> Iterator[RealModeVcpu]:
    with Kvm() as kvm:
        g = RealModeVcpu(kvm)
        try:
            yield g
        finally:
            g.close()
            g.memory.close()


def run_until_halt(vcpu: Vcpu, limit: int = 32) -> list[VcpuExit]:
    """Run, answering no reads, until the guest halts; every exit before the HLT."""
    seen: list[VcpuExit] = []
    for _ in range(limit):
        ex = vcpu.run()
        if isinstance(ex, Halt):
            return seen
        seen.append(ex)
    raise AssertionError(f"no HLT after {limit} exits: {seen}")


@needs_kvm
def test_port_io_and_mmio_exits_and_read_completion(guest: RealModeVcpu) -> None:
    guest.load(
        bytes.fromhex(
            "ba0005"  # mov dx, 0x500
            "b83412"  # mov ax, 0x1234
            "ef"  # out dx, ax
            "66ed"  # in eax, dx
            "6689c3"  # mov ebx, eax
            "b80020"  # mov ax, 0x2000
            "8ed8"  # mov ds, ax
            "66b90df0feca"  # mov ecx, 0xcafef00d
            "66890e1000"  # mov [0x10], ecx
            "66a12000"  # mov eax, [0x20]
            "f4"  # hlt
        )
    )
    vcpu = guest.vcpu

    out = vcpu.run()
    assert isinstance(out, PortOut)
    assert (out.port, out.size, out.count, out.data) == (0x500, 2, 1, b"\x34\x12")
    assert out.reason is ExitReason.IO and out.is_write

    inp = vcpu.run()
    assert isinstance(inp, PortIn)
    assert (inp.port, inp.size, inp.count, inp.is_write) == (0x500, 4, 1, False)
    inp.complete((0x12345678).to_bytes(4, "little"))

    write = vcpu.run()
    assert isinstance(write, MmioWrite)
    assert (write.address, write.length, write.data) == (0x20010, 4, b"\x0d\xf0\xfe\xca")

    read = vcpu.run()
    assert isinstance(read, MmioRead)
    assert (read.address, read.length, read.is_write) == (0x20020, 4, False)
    read.complete(b"\xef\xbe\xad\xde")

    assert isinstance(vcpu.run(), Halt)
    regs = vcpu.get_regs()
    assert regs.rbx == 0x12345678, "the IN completion did not reach the guest"
    assert regs.rax & 0xFFFFFFFF == 0xDEADBEEF, "the MMIO read completion did not reach the guest"


@needs_kvm
def test_string_port_io_carries_every_item(guest: RealModeVcpu) -> None:
    guest.memory[0x2000:0x2003] = b"abc"
    guest.load(
        bytes.fromhex(
            "ba0005"  # mov dx, 0x500
            "be0020"  # mov si, 0x2000
            "b90300"  # mov cx, 3
            "fc"  # cld
            "f36e"  # rep outsb
            "bf0030"  # mov di, 0x3000
            "b90200"  # mov cx, 2
            "f36d"  # rep insw
            "f4"  # hlt
        )
    )
    vcpu = guest.vcpu
    sent = b""
    answered = b""
    for _ in range(16):
        ex = vcpu.run()
        if isinstance(ex, Halt):
            break
        if isinstance(ex, PortOut):
            assert (ex.port, ex.size) == (0x500, 1)
            assert len(ex.data) == ex.count
            sent += ex.data
        else:
            assert isinstance(ex, PortIn)
            assert (ex.port, ex.size) == (0x500, 2)
            data = bytes(range(len(answered) + 1, len(answered) + 1 + 2 * ex.count))
            ex.complete(data)
            answered += data
    else:
        raise AssertionError("no HLT")
    assert sent == b"abc"
    assert guest.memory[0x3000:0x3004] == answered == b"\x01\x02\x03\x04"


@needs_kvm
def test_completion_refuses_the_wrong_length(guest: RealModeVcpu) -> None:
    guest.load(bytes.fromhex("ba0005edf4"))  # mov dx, 0x500; in ax, dx; hlt
    ex = guest.vcpu.run()
    assert isinstance(ex, PortIn) and ex.size == 2
    with pytest.raises(ExitCompletionError, match="wants 2 bytes"):
        ex.complete(b"\x01")
    ex.complete(b"\x01\x02")
    assert run_until_halt(guest.vcpu) == []
    assert guest.vcpu.get_regs().rax & 0xFFFF == 0x0201


@needs_kvm
def test_immediate_exit_gives_interrupted(guest: RealModeVcpu) -> None:
    guest.load(b"\xf4")
    guest.vcpu.kvm_run.immediate_exit = 1
    assert isinstance(guest.vcpu.run(), Interrupted)
    guest.vcpu.kvm_run.immediate_exit = 0
    assert isinstance(guest.vcpu.run(), Halt)


@needs_kvm
def test_triple_fault_gives_shutdown(guest: RealModeVcpu) -> None:
    # Flat 32-bit protected mode with an IDT of limit 0: ud2 faults, delivering the fault
    # faults, and the double fault shuts down. (Real mode would not do: KVM's emulation of
    # real-mode interrupts does not check the IDT limit.)
    sregs = guest.vcpu.get_sregs()
    for name in ("cs", "ds", "es", "ss", "fs", "gs"):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.present, seg.s, seg.g, seg.db, seg.dpl = (
            0,
            0xFFFFFFFF,
            1,
            1,
            1,
            1,
            0,
        )
        seg.type, seg.selector = (0xB, 0x8) if name == "cs" else (0x3, 0x10)
    sregs.cr0 |= 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    guest.vcpu.set_sregs(sregs)
    guest.load(bytes.fromhex("0f0b"))  # ud2
    ex = guest.vcpu.run()
    assert isinstance(ex, Shutdown)
    assert ex.reason is ExitReason.SHUTDOWN


@needs_kvm
def test_fetching_code_from_mmio_gives_an_internal_error(guest: RealModeVcpu) -> None:
    guest.load(bytes.fromhex("ea00000020"))  # jmp 0x2000:0 (guest-physical 0x20000, no memory)
    ex = guest.vcpu.run()
    assert isinstance(ex, InternalErrorExit), ex
    assert ex.suberror == 1  # KVM_INTERNAL_ERROR_EMULATION
    assert isinstance(ex.data, tuple)
    assert "InternalErrorExit(suberror=1" in repr(ex)


# -- decoding made-up pages: the kinds a test guest cannot easily cause ------------------


@pytest.fixture
def page() -> Iterator[tuple[mmap.mmap, uapi.kvm_run]]:
    # Not closed: the kvm_run view exports the buffer until the garbage collector takes both.
    buf = mmap.mmap(-1, 4096)
    yield buf, uapi.kvm_run.from_buffer(buf)


def test_decode_fail_entry(page: tuple[mmap.mmap, uapi.kvm_run]) -> None:
    buf, run = page
    run.exit_reason = ExitReason.FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x80000021
    run.fail_entry.cpu = 3
    ex = exits.decode(buf)
    assert isinstance(ex, FailEntry)
    assert (ex.hardware_reason, ex.cpu) == (0x80000021, 3)


def test_decode_system_event_and_internal_error_words(
    page: tuple[mmap.mmap, uapi.kvm_run],
) -> None:
    buf, run = page
    run.exit_reason = ExitReason.SYSTEM_EVENT
    run.system_event.type = 2
    run.system_event.ndata = 2
    run.system_event.data[0], run.system_event.data[1], run.system_event.data[2] = 7, 8, 9
    ex = exits.decode(buf)
    assert isinstance(ex, SystemEvent)
    assert (ex.type, ex.data) == (2, (7, 8))

    run.exit_reason = ExitReason.INTERNAL_ERROR
    run.internal.ndata = 99  # more than the 16 words there are room for
    ex = exits.decode(buf)
    assert isinstance(ex, InternalErrorExit)
    assert ex.suberror == 2 and len(ex.data) == 16


def test_decode_other_exits_keep_the_raw_reason(page: tuple[mmap.mmap, uapi.kvm_run]) -> None:
    buf, run = page
    run.exit_reason = ExitReason.X86_RDMSR
    ex = exits.decode(buf)
    assert isinstance(ex, OtherExit)
    assert (ex.reason, ex.name) == (29, "X86_RDMSR")
    run.exit_reason = 1000
    ex = exits.decode(buf)
    assert isinstance(ex, OtherExit) and ex.name == "1000"


def test_decode_offsets_match_the_kvm_run_mirror(page: tuple[mmap.mmap, uapi.kvm_run]) -> None:
    """The decoder's struct formats agree with the ctypes mirror (itself checked against the
    kernel headers by test_layout.py)."""
    buf, run = page
    run.exit_reason = ExitReason.IO
    run.io.direction, run.io.size, run.io.port = 1, 4, 0xCF8
    run.io.count, run.io.data_offset = 2, 0x800
    buf[0x800:0x808] = b"12345678"
    ex = exits.decode(buf)
    assert isinstance(ex, PortOut)
    assert (ex.port, ex.size, ex.count, ex.data) == (0xCF8, 4, 2, b"12345678")

    run.exit_reason = ExitReason.MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEB0_0004, 2, 0
    read = exits.decode(buf)
    assert isinstance(read, MmioRead)
    assert (read.address, read.length) == (0xFEB0_0004, 2)
    read.complete(b"\xaa\xbb")
    assert bytes(run.mmio.data[:2]) == b"\xaa\xbb"

    run.mmio.is_write = 1
    write = exits.decode(buf)
    assert isinstance(write, MmioWrite)
    assert write.data == b"\xaa\xbb"
