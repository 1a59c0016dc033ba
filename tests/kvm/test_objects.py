"""Kvm / Vm / Vcpu: every wrapper's error path, and get/set round trips on a real vCPU."""

from __future__ import annotations

import ctypes
import errno
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from intrahost.kvm import Cap, Kvm, KvmError, MpState, Vcpu, Vm, uapi
from intrahost.kvm.objects import msr_buffer

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm (read/write)"
)

# Arguments for each public wrapper (those with no parameters need no entry).
ARGS: dict[str, tuple[Any, ...]] = {
    "check_extension": (Cap.IRQCHIP,),
    "create_vm": (),
    "create_vcpu": (0, 4096),
    "set_tss_addr": (0xFFFBD000,),
    "set_identity_map_addr": (0xFFFBC000,),
    "set_user_memory_region": (0, 0, 4096, 0),
    "irq_line": (4, 1),
    "ioeventfd": (0, 0xD000_0050, 4),
    "irqfd": (0, 5),
    "get_irqchip": (0,),
    "set_irqchip": (uapi.kvm_irqchip(),),
    "set_pit2": (uapi.kvm_pit_state2(),),
    "set_clock": (uapi.kvm_clock_data(),),
    "enable_cap": (Cap.VM_MOVE_ENC_CONTEXT_FROM, 3),
    "memory_encrypt_op": (uapi.kvm_sev_cmd(),),
    "memory_encrypt_reg_region": (0, 4096),
    "memory_encrypt_unreg_region": (0, 4096),
    "set_regs": (uapi.kvm_regs(),),
    "set_sregs": (uapi.kvm_sregs(),),
    "set_sregs2": (uapi.kvm_sregs2(),),
    "set_fpu": (uapi.kvm_fpu(),),
    "set_xsave": (bytes(4096),),
    "set_xcrs": (uapi.kvm_xcrs(),),
    "set_debugregs": (uapi.kvm_debugregs(),),
    "set_lapic": (uapi.kvm_lapic_state(),),
    "set_mp_state": (0,),
    "set_vcpu_events": (uapi.kvm_vcpu_events(),),
    "get_msrs": ([0x10],),
    "set_msrs": ([(0x10, 0)],),
    "read_msrs": (msr_buffer([0x10]),),
    "set_cpuid_table": (bytes(40),),
    "set_cpuid2": ([uapi.kvm_cpuid_entry2()],),
    "set_tsc_khz": (1000000,),
    "get_device_attr_u64": (0, 0),
    "set_device_attr_u64": (0, 0, 0),
    "set_tsc_offset": (0,),
}
# Not ioctl wrappers, or wrappers that swallow the errno on purpose.
NOT_WRAPPERS = {"close", "detach", "from_fd", "has_device_attr", "kvm_run", "run_buffer"}


def _closed_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def _wrappers(cls: type) -> Iterator[str]:
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or name in NOT_WRAPPERS or not callable(member):
            continue
        yield name


def _objects(fd: int) -> list[Any]:
    kvm = Kvm.from_fd(fd)
    vm = Vm(fd, None)
    vcpu = Vcpu(fd, vm, 0, mmap_size=0)
    return [kvm, vm, vcpu]


@pytest.mark.parametrize("cls", [Kvm, Vm, Vcpu], ids=lambda c: c.__name__)
def test_every_wrapper_raises_ebadf_on_a_closed_fd(cls: type) -> None:
    fd = _closed_fd()
    obj = next(o for o in _objects(fd) if type(o) is cls)
    names = list(_wrappers(cls))
    assert names, "no wrappers found"
    for name in names:
        method: Callable[..., Any] = getattr(obj, name)
        if name == "run":
            with pytest.raises(KvmError) as info:
                method()
        else:
            with pytest.raises(KvmError) as info:
                method(*ARGS.get(name, ()))
        assert info.value.errno == errno.EBADF, name
        assert info.value.obj.startswith(cls.__name__)
        assert info.value.ioctl.startswith("KVM_"), name
    obj._fd = -1  # nothing to close: the fd number was never ours


@pytest.fixture
def vcpu() -> Iterator[Vcpu]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        vm.create_irqchip()
        vm.create_pit2()
        with vm.create_vcpu(0) as vcpu:
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
            yield vcpu


@needs_kvm
def test_state_round_trips(vcpu: Vcpu) -> None:
    """Every getter's output goes back through its setter and reads back the same."""
    pairs: list[tuple[str, Callable[[], Any], Callable[[Any], None]]] = [
        ("regs", vcpu.get_regs, vcpu.set_regs),
        ("sregs", vcpu.get_sregs, vcpu.set_sregs),
        ("sregs2", vcpu.get_sregs2, vcpu.set_sregs2),
        ("fpu", vcpu.get_fpu, vcpu.set_fpu),
        ("xcrs", vcpu.get_xcrs, vcpu.set_xcrs),
        ("debugregs", vcpu.get_debugregs, vcpu.set_debugregs),
        ("lapic", vcpu.get_lapic, vcpu.set_lapic),
        ("vcpu_events", vcpu.get_vcpu_events, vcpu.set_vcpu_events),
    ]
    for name, get, put in pairs:
        before = get()
        put(before)
        assert bytes(get()) == bytes(before), name

    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip = 0x1122334455667788, 42, 0x1000
    vcpu.set_regs(regs)
    after = vcpu.get_regs()
    assert (after.rax, after.r15, after.rip) == (0x1122334455667788, 42, 0x1000)

    assert vcpu.vm is not None and vcpu.vm.kvm is not None
    size = vcpu.vm.kvm.check_extension(Cap.XSAVE2) or 4096
    xsave = vcpu.get_xsave(size)
    vcpu.set_xsave(xsave)
    assert vcpu.get_xsave(size) == xsave

    vcpu.set_mp_state(MpState.HALTED)
    assert vcpu.get_mp_state() == MpState.HALTED
    vcpu.set_mp_state(MpState.RUNNABLE)

    indices = vcpu.vm.kvm.get_msr_index_list()
    msrs = vcpu.get_msrs(indices)
    assert len(msrs) == len(indices)
    assert vcpu.set_msrs(msrs.items()) == len(msrs)
    assert vcpu.get_msrs([0x174]) == {0x174: msrs[0x174]}

    khz = vcpu.get_tsc_khz()
    assert khz > 0
    vcpu.set_tsc_khz(khz)

    cpuid = vcpu.get_cpuid2()
    assert cpuid and cpuid[0].function == 0


@needs_kvm
def test_vm_state_round_trips(vcpu: Vcpu) -> None:
    vm = vcpu.vm
    assert vm is not None
    for chip_id in (0, 1, 2):
        chip = vm.get_irqchip(chip_id)
        vm.set_irqchip(chip)
        assert bytes(vm.get_irqchip(chip_id)) == bytes(chip)
    pit = vm.get_pit2()
    vm.set_pit2(pit)
    assert vm.get_pit2().channels[0].count == pit.channels[0].count
    clock = vm.get_clock()
    vm.set_clock(clock)
    assert vm.get_clock().clock >= clock.clock


@needs_kvm
def test_big_structs_are_not_truncated(vcpu: Vcpu) -> None:
    """kvm_lapic_state is 1 KiB and kvm_xsave 4 KiB: both travel whole (no 1 KiB copy)."""
    lapic = vcpu.get_lapic()
    raw = bytearray(bytes(lapic))
    raw[0x80] = 0x20  # TPR, last bytes region of the first 1 KiB are the ones at risk
    vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(bytes(raw)))
    assert bytes(vcpu.get_lapic())[0x80] == 0x20
    assert ctypes.sizeof(uapi.kvm_xsave) == 4096


def test_the_bindings_carry_no_platform_hooks() -> None:
    """What a platform changes about KVM's answers lives in its own subclasses (the SEV
    model's: intrahost.sevmodel.attached), not in the bindings."""
    fd = _closed_fd()
    vm = Vm(fd, None)
    vcpu = Vcpu(fd, vm, 0, mmap_size=0)
    for obj in (vm, vcpu):
        assert set(vars(obj)) <= {"_fd", "kvm", "vm", "vcpu_id", "_map", "_run"}, vars(obj)
        obj._fd = -1


def test_detach_hands_the_fd_over() -> None:
    r, w = os.pipe()
    os.close(w)
    vm = Vm(r, None)
    assert vm.detach() == r and vm.closed
    vm.close()  # the fd is no longer this object's
    os.fstat(r)
    os.close(r)


@needs_kvm
def test_vm_fd_from_another_process_gives_eio() -> None:
    """KVM binds a VM to its creator's mm: the reason the destination builds its own VM."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        pid = os.fork()
        if pid == 0:  # child: same fd number, different mm
            try:
                vm.check_extension(Cap.IRQCHIP)
                os._exit(1)
            except KvmError as e:
                os._exit(0 if e.errno == errno.EIO else 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@needs_kvm
def test_sev_is_refused_by_this_kernel() -> None:
    """Without SEV the kernel refuses MOVE with EINVAL and the encrypt op with ENOTTY."""
    with Kvm() as kvm, kvm.create_vm() as src, kvm.create_vm() as dst:
        assert kvm.check_extension(Cap.VM_MOVE_ENC_CONTEXT_FROM) in (0, 1)
        with pytest.raises(KvmError) as info:
            dst.enable_cap(Cap.VM_MOVE_ENC_CONTEXT_FROM, src.fd)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(KvmError) as info:
            dst.memory_encrypt_op(None)
        assert info.value.errno == errno.ENOTTY


@needs_kvm
def test_a_raw_cpuid_table_is_set_as_given() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as a, vm.create_vcpu(1) as b:
        entries = kvm.get_supported_cpuid()
        a.set_cpuid2(entries)
        b.set_cpuid_table(b"".join(bytes(e) for e in entries))
        assert [bytes(e) for e in b.get_cpuid2()] == [bytes(e) for e in a.get_cpuid2()]
        with pytest.raises(ValueError, match="kvm_cpuid_entry2"):
            b.set_cpuid_table(bytes(39))
