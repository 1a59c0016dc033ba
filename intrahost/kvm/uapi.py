"""ctypes mirrors of the x86-64 KVM uapi structs (``<linux/kvm.h>``, ``<asm/kvm.h>``).

Field names and order follow the kernel headers exactly; ``tests/kvm/test_layout.py``
compiles a C program against the system headers and checks ``sizeof`` and ``offsetof`` of
every struct and field declared here. Annotations are for the type checker only: ctypes
reads ``_fields_``.

Structs that end in a flexible array (``kvm_msrs``, ``kvm_msr_list``, ``kvm_cpuid2``) are
declared with their fixed header only; :func:`flex` builds a buffer type with room for N
entries.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    Array,
    c_char,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)
from typing import Any

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64


class Struct(ctypes.Structure):
    """Base of every mirror: raw-byte conversion (the ABI is stable)."""

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(f"{cls.__name__} needs {ctypes.sizeof(cls)} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)

    def to_bytes(self) -> bytes:
        return bytes(self)


# --- memory ---------------------------------------------------------------------------------


class kvm_userspace_memory_region(Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int


# --- kvm_run (the shared page of a vCPU) ------------------------------------------------------


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]
    hardware_entry_failure_reason: int
    cpu: int


class kvm_run_io(Struct):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]
    direction: int
    size: int
    port: int
    count: int
    data_offset: int


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]
    phys_addr: int
    data: Array[c_uint8]
    len: int
    is_write: int


class kvm_run_internal(Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]
    suberror: int
    ndata: int
    data: Array[c_uint64]


class kvm_run_system_event(Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]
    type: int
    ndata: int
    data: Array[c_uint64]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", c_char * 256),
    ]


class kvm_run(Struct):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", c_char * 2048),
    ]
    request_interrupt_window: int
    immediate_exit: int
    exit_reason: int
    ready_for_interrupt_injection: int
    if_flag: int
    flags: int
    cr8: int
    apic_base: int
    fail_entry: kvm_run_fail_entry
    io: kvm_run_io
    mmio: kvm_run_mmio
    internal: kvm_run_internal
    system_event: kvm_run_system_event


# --- registers -------------------------------------------------------------------------------


class kvm_regs(Struct):
    _fields_ = [
        (name, u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


class kvm_segment(Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the kernel's name
    g: int
    avl: int
    unusable: int


class kvm_dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]
    base: int
    limit: int


_SEGMENTS = [(name, kvm_segment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]]
_CONTROL = [(name, u64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]]


class kvm_sregs(Struct):
    _fields_ = [
        *_SEGMENTS,
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *_CONTROL,
        ("interrupt_bitmap", u64 * 4),
    ]
    cs: kvm_segment
    ds: kvm_segment
    es: kvm_segment
    fs: kvm_segment
    gs: kvm_segment
    ss: kvm_segment
    tr: kvm_segment
    ldt: kvm_segment
    gdt: kvm_dtable
    idt: kvm_dtable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: Array[c_uint64]


class kvm_sregs2(Struct):
    _fields_ = [
        *_SEGMENTS,
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *_CONTROL,
        ("flags", u64),
        ("pdptrs", u64 * 4),
    ]
    cs: kvm_segment
    ss: kvm_segment
    cr0: int
    cr3: int
    cr4: int
    efer: int
    apic_base: int
    flags: int
    pdptrs: Array[c_uint64]


class kvm_fpu(Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]
    fcw: int
    mxcsr: int


class kvm_xsave(Struct):
    """The legacy 4 KiB XSAVE area (KVM_GET_XSAVE2 may need more: see Vcpu.get_xsave)."""

    _fields_ = [("region", u32 * 1024)]
    region: Array[c_uint32]


class kvm_xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]
    xcr: int
    value: int


class kvm_xcrs(Struct):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * 16),
        ("padding", u64 * 16),
    ]
    nr_xcrs: int
    flags: int
    xcrs: Array[kvm_xcr]


class kvm_msr_entry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]
    index: int
    data: int


class kvm_msrs(Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]
    nmsrs: int


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", u32)]
    nmsrs: int


class kvm_cpuid_entry2(Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class kvm_cpuid2(Struct):
    _fields_ = [("nent", u32), ("padding", u32)]
    nent: int


class kvm_lapic_state(Struct):
    _fields_ = [("regs", c_char * 1024)]
    regs: bytes


class kvm_vcpu_events_exception(Struct):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]
    injected: int
    nr: int
    pending: int


class kvm_vcpu_events_interrupt(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]
    injected: int
    nr: int


class kvm_vcpu_events_nmi(Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]
    injected: int
    pending: int
    masked: int


class kvm_vcpu_events_smi(Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Struct):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]
    exception: kvm_vcpu_events_exception
    interrupt: kvm_vcpu_events_interrupt
    nmi: kvm_vcpu_events_nmi
    sipi_vector: int
    flags: int


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", u32)]
    mp_state: int


class kvm_debugregs(Struct):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]
    db: Array[c_uint64]
    dr6: int
    dr7: int


class kvm_device_attr(Struct):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]
    flags: int
    group: int
    attr: int
    addr: int


# --- VM-wide state ---------------------------------------------------------------------------


class kvm_clock_data(Struct):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]
    clock: int
    flags: int
    realtime: int
    host_tsc: int


class kvm_pic_state(Struct):
    _fields_ = [
        (name, u8)
        for name in [
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        ]
    ]
    irr: int
    imr: int
    isr: int


class kvm_ioapic_state(Struct):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * 24),
    ]
    base_address: int
    irr: int
    redirtbl: Array[c_uint64]


class kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_chip)]
    chip_id: int
    chip: kvm_irqchip_chip


class kvm_pit_channel_state(Struct):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]
    count: int
    mode: int
    count_load_time: int


class kvm_pit_state2(Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]
    channels: Array[kvm_pit_channel_state]
    flags: int


class kvm_pit_config(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]
    flags: int


class kvm_enable_cap(Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]
    cap: int
    flags: int
    args: Array[c_uint64]


class kvm_irq_level_u(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(Struct):
    _anonymous_ = ("u",)
    _fields_ = [("u", kvm_irq_level_u), ("level", u32)]
    irq: int
    status: int
    level: int


# --- eventfds: ioeventfd (guest writes signal an eventfd) and irqfd (an eventfd raises a GSI) --


class kvm_ioeventfd(Struct):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]
    datamatch: int
    addr: int
    len: int
    fd: int
    flags: int


class kvm_irqfd(Struct):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]
    fd: int
    gsi: int
    flags: int
    resamplefd: int


# --- SEV -------------------------------------------------------------------------------------


class kvm_sev_cmd(Struct):
    _fields_ = [("id", u32), ("pad0", u32), ("data", u64), ("error", u32), ("sev_fd", u32)]
    id: int
    data: int
    error: int
    sev_fd: int


class kvm_sev_init(Struct):
    """KVM_SEV_INIT2's argument (Linux 6.10+; newer than some installed headers)."""

    _fields_ = [
        ("vmsa_features", u64),
        ("flags", u32),
        ("ghcb_version", u16),
        ("pad1", u16),
        ("pad2", u32 * 8),
    ]
    vmsa_features: int
    flags: int
    ghcb_version: int


class kvm_sev_launch_start(Struct):
    _fields_ = [
        ("handle", u32),
        ("policy", u32),
        ("dh_uaddr", u64),
        ("dh_len", u32),
        ("session_uaddr", u64),
        ("session_len", u32),
    ]
    handle: int
    policy: int
    dh_uaddr: int
    dh_len: int
    session_uaddr: int
    session_len: int


class kvm_sev_launch_update_data(Struct):
    _fields_ = [("uaddr", u64), ("len", u32)]
    uaddr: int
    len: int


class kvm_sev_launch_secret(Struct):
    _fields_ = [
        ("hdr_uaddr", u64),
        ("hdr_len", u32),
        ("guest_uaddr", u64),
        ("guest_len", u32),
        ("trans_uaddr", u64),
        ("trans_len", u32),
    ]
    hdr_uaddr: int
    hdr_len: int
    guest_uaddr: int
    guest_len: int
    trans_uaddr: int
    trans_len: int


class kvm_sev_launch_measure(Struct):
    _fields_ = [("uaddr", u64), ("len", u32)]
    uaddr: int
    len: int


class kvm_sev_guest_status(Struct):
    _fields_ = [("handle", u32), ("policy", u32), ("state", u32)]
    handle: int
    policy: int
    state: int


class kvm_enc_region(Struct):
    _fields_ = [("addr", u64), ("size", u64)]
    addr: int
    size: int


# --- flexible arrays -------------------------------------------------------------------------


_FLEX: dict[tuple[type, type, int], type[Struct]] = {}


def flex(header: type[Struct], entry: type, n: int) -> Any:
    """A struct type: ``header`` followed by ``n`` entries (a C flexible array member)."""
    key = (header, entry, n)
    if key not in _FLEX:
        fields = [("hdr", header), ("entries", entry * n)]  # type: ignore[operator]
        _FLEX[key] = type(f"{header.__name__}_{n}", (Struct,), {"_fields_": fields})
    return _FLEX[key]
