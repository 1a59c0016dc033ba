"""KVM ioctl numbers, capabilities, exit reasons and other constants.

Every ioctl number is computed from the struct it carries, as the kernel's ``_IO*`` macros do;
none is typed as hex. ``tests/kvm/test_layout.py`` compares each value with the C headers.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import Any

from intrahost.kvm import uapi

# --- the _IOC encoding (include/uapi/asm-generic/ioctl.h) ------------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _IOR(nr: int, arg: Any) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(arg))


def _IOW(nr: int, arg: Any) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(arg))


def _IOWR(nr: int, arg: Any) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(arg))


KVM_API_VERSION = 12

# --- system ioctls (/dev/kvm) ----------------------------------------------------------------
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, uapi.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, uapi.kvm_cpuid2)

# --- VM ioctls -------------------------------------------------------------------------------
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, uapi.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, uapi.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(0x62, uapi.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(0x63, uapi.kvm_irqchip)
KVM_IRQFD = _IOW(0x76, uapi.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(0x77, uapi.kvm_pit_config)
KVM_IOEVENTFD = _IOW(0x79, uapi.kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(0x7B, uapi.kvm_clock_data)
KVM_GET_CLOCK = _IOR(0x7C, uapi.kvm_clock_data)
KVM_GET_PIT2 = _IOR(0x9F, uapi.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(0xA0, uapi.kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(0xA3, uapi.kvm_enable_cap)
KVM_MEMORY_ENCRYPT_OP = _IOWR(0xBA, ctypes.c_ulong)
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(0xBB, uapi.kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(0xBC, uapi.kvm_enc_region)

# --- vCPU ioctls -----------------------------------------------------------------------------
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, uapi.kvm_regs)
KVM_SET_REGS = _IOW(0x82, uapi.kvm_regs)
KVM_GET_SREGS = _IOR(0x83, uapi.kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, uapi.kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, uapi.kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, uapi.kvm_msrs)
KVM_GET_FPU = _IOR(0x8C, uapi.kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, uapi.kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, uapi.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, uapi.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, uapi.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, uapi.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(0x98, uapi.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, uapi.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, uapi.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, uapi.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xA1, uapi.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(0xA2, uapi.kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(0xA2)
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_GET_XSAVE = _IOR(0xA4, uapi.kvm_xsave)
KVM_SET_XSAVE = _IOW(0xA5, uapi.kvm_xsave)
KVM_GET_XCRS = _IOR(0xA6, uapi.kvm_xcrs)
KVM_SET_XCRS = _IOW(0xA7, uapi.kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(0xAD)
KVM_GET_SREGS2 = _IOR(0xCC, uapi.kvm_sregs2)
KVM_SET_SREGS2 = _IOW(0xCD, uapi.kvm_sregs2)
KVM_GET_XSAVE2 = _IOR(0xCF, uapi.kvm_xsave)
KVM_SET_DEVICE_ATTR = _IOW(0xE1, uapi.kvm_device_attr)
KVM_GET_DEVICE_ATTR = _IOW(0xE2, uapi.kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _IOW(0xE3, uapi.kvm_device_attr)


class Cap(IntEnum):
    """KVM_CAP_* numbers that intrahost queries or enables."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT2 = 33
    PIT_STATE2 = 35
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    KVMCLOCK_CTRL = 76
    IMMEDIATE_EXIT = 136
    VM_COPY_ENC_CONTEXT_FROM = 197
    SREGS2 = 200
    VM_MOVE_ENC_CONTEXT_FROM = 206
    XSAVE2 = 208
    VM_TSC_CONTROL = 214


class ExitReason(IntEnum):
    """KVM_EXIT_* values of ``kvm_run.exit_reason``."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37


class MpState(IntEnum):
    """KVM_MP_STATE_* values (x86 subset)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2

KVM_PIT_SPEAKER_DUMMY = 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

#: Buffer sizes for the flexible-array ioctls (not kernel constants).
MAX_CPUID_ENTRIES = 256
MAX_MSR_ENTRIES = 256

#: KVM_CREATE_VM types (x86). The SEV types are Linux 6.10+.
KVM_X86_DEFAULT_VM = 0
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
