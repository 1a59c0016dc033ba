"""Booting a guest: load its image into guest memory and set the boot vCPU's registers.

The boot vCPU starts in the state :func:`intrahost.vmm.guests.loader.boot_cpu_state`
describes (the multiboot one: 32-bit, flat segments, paging off). The other vCPUs wait for
INIT/SIPI from the boot vCPU, as on real hardware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from intrahost.kvm import uapi
from intrahost.vmm.guests.loader import (
    BootCpuState,
    SegmentState,
    boot_cpu_state,
    load_guest,
    read_guest_image,
)

if TYPE_CHECKING:
    from intrahost.kvm import Vcpu
    from intrahost.vmm.machine import Machine


def boot_guest(machine: Machine) -> int:
    """Load the guest and set the boot vCPU; returns the image's size in bytes."""
    image = read_guest_image(machine.config.guest)
    info = load_guest(image, machine.memory.buffer, machine.config.cmdline)
    set_boot_state(machine.vcpus[0], boot_cpu_state(info))
    return len(image)


def _segment(s: SegmentState) -> uapi.kvm_segment:
    return uapi.kvm_segment(
        base=s.base,
        limit=s.limit,
        selector=s.selector,
        type=s.type,
        present=s.present,
        dpl=s.dpl,
        db=s.db,
        s=s.s,
        l=s.l,
        g=s.g,
    )


def set_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(sregs, name, _segment(getattr(state, name)))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = uapi.kvm_regs()
    regs.rip, regs.rax, regs.rbx, regs.rflags = state.rip, state.rax, state.rbx, state.rflags
    vcpu.set_regs(regs)
