"""KVM_IOEVENTFD and KVM_IRQFD on a real VM: a guest store signals an eventfd without an exit,
and an eventfd write raises a GSI on the in-kernel irqchip."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import time
from collections.abc import Iterator

import pytest
from support import needs_kvm

from intrahost.kvm import Kvm, KvmError, MmioWrite, PortOut, Vcpu, Vm
from intrahost.kvm import constants as K

pytestmark = needs_kvm

NOTIFY = 0x8_0050  # unbacked: the VM has RAM at 0..64 KiB only


# Real mode at 0: mov ax, 0x8000; mov ds, ax; mov dword [0x50], VALUE; out 0x10, al
# (HLT would not exit: the in-kernel LAPIC halts the vCPU in the kernel).
def _code(value: int) -> bytes:
    return bytes.fromhex("b800808ed866c7065000") + value.to_bytes(4, "little") + b"\xe6\x10"


@pytest.fixture
def vm_vcpu() -> Iterator[tuple[Vm, Vcpu, mmap.mmap]]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        vm.create_irqchip()
        ram = mmap.mmap(-1, 0x10000)
        anchor = ctypes.c_char.from_buffer(ram)
        vm.set_user_memory_region(0, 0, 0x10000, ctypes.addressof(anchor))
        with vm.create_vcpu(0) as vcpu:
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
            sregs = vcpu.get_sregs()
            sregs.cs.base = sregs.cs.selector = 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = 0, 2
            vcpu.set_regs(regs)
            yield vm, vcpu, ram
        del anchor


def _run_to_out(vcpu: Vcpu) -> list[object]:
    exits: list[object] = []
    for _ in range(10):
        exit_ = vcpu.run()
        exits.append(exit_)
        if isinstance(exit_, PortOut):
            break
    return exits


def test_ioeventfd_datamatch_signals_without_an_exit(
    vm_vcpu: tuple[Vm, Vcpu, mmap.mmap],
) -> None:
    vm, vcpu, ram = vm_vcpu
    ram[: len(_code(1))] = _code(1)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, NOTIFY, 4, datamatch=1)
        exits = _run_to_out(vcpu)
        assert isinstance(exits[-1], PortOut), exits  # the guest ran past the store
        assert not any(isinstance(e, MmioWrite) for e in exits), exits
        assert os.eventfd_read(efd) == 1
        with pytest.raises(KvmError) as info:  # the same registration twice
            vm.ioeventfd(efd, NOTIFY, 4, datamatch=1)
        assert info.value.errno == errno.EEXIST
        vm.ioeventfd(efd, NOTIFY, 4, datamatch=1, deassign=True)
        with pytest.raises(KvmError) as info:
            vm.ioeventfd(efd, NOTIFY, 4, datamatch=1, deassign=True)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(efd)


def test_ioeventfd_other_value_exits(vm_vcpu: tuple[Vm, Vcpu, mmap.mmap]) -> None:
    vm, vcpu, ram = vm_vcpu
    ram[: len(_code(2))] = _code(2)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, NOTIFY, 4, datamatch=1)
        exit_ = vcpu.run()
        assert isinstance(exit_, MmioWrite)
        assert (exit_.address, exit_.data) == (NOTIFY, (2).to_bytes(4, "little"))
        assert not select.select([efd], [], [], 0)[0]
    finally:
        os.close(efd)


def test_irqfd_raises_the_gsi() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            vm.irqfd(efd, 5)
            assert not vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & 1 << 5
            os.eventfd_write(efd, 1)
            # The kernel injects from a work item: wait for the PIC to latch the edge.
            deadline = time.monotonic() + 10
            while not vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & 1 << 5:
                assert time.monotonic() < deadline, "IRQ 5 never reached the PIC"
                time.sleep(0.001)
            vm.irqfd(efd, 5, deassign=True)
            resample = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                vm.irqfd(efd, 6, resample_fd=resample)  # a level-triggered line
                vm.irqfd(efd, 6, deassign=True)
            finally:
                os.close(resample)
        finally:
            os.close(efd)
