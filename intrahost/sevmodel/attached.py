"""The VMM's real KVM VM, made to answer as the kernel's SEV VM would: :class:`AttachedVm`.

The model cannot change what the real KVM does for a VM whose SEV context it holds, so the
model platform hands the VMM these subclasses of the bindings' :class:`~intrahost.kvm.Vm` and
:class:`~intrahost.kvm.Vcpu` (:meth:`~intrahost.sevmodel.client.ModelPlatform.attach`). Each
overrides the bindings' one ioctl entry point, and before every ioctl checks, in this order:

1. the VM is alive: once its context moved away (the model VM is dead), every ioctl on the VM
   and its vCPUs fails with ``EIO``, as the kernel answers for a dead SEV VM. The check is a
   zero-timeout poll of the model VM's fd; dead is final, also after the model VM is closed;
2. on a vCPU whose register state is protected (SEV-ES, after LAUNCH_UPDATE_VMSA or after the
   MOVE of an SEV-ES context), the register getters and setters answer as ``x86.c`` does
   (the checks of "KVM: x86: add fields to struct kvm_arch for CoCo features", Linux 6.10):

   * on a VM of the SEV-ES or SNP type (``kvm->arch.has_protected_state``): REGS, SREGS,
     SREGS2, DEBUGREGS and XCRS fail with ``EINVAL`` once the vCPU's state is protected; FPU,
     XSAVE and XSAVE2 once its FPU state is confidential, which only LAUNCH_UPDATE_VMSA makes
     it (a MOVE destination's vCPUs are protected but their FPU state is not confidential);
   * on a default-type VM initialised with KVM_SEV_ES_INIT they succeed, as the kernel's do:
     a getter returns no guest state (the kernel returns its own stale copy; the model
     zeroes), a setter changes nothing the guest sees;
3. KVM_RUN runs between ``vcpu_enter`` and ``vcpu_exit`` of the model VM,
   which hold the model's vCPU mutex as KVM holds ``vcpu->mutex``; on a protected vCPU, the
   VMSA from ``vcpu_enter`` is loaded into the real vCPU before the run and saved back after
   it. On the kernel platform the hardware does this.

The VMSA is the raw bytes of kvm_regs, kvm_sregs, kvm_fpu, kvm_xcrs and kvm_debugregs, in
that order.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, Any

from intrahost.kvm import Kvm, KvmError, Vcpu, Vm, uapi
from intrahost.kvm import constants as K
from intrahost.sev.interface import SevError

if TYPE_CHECKING:
    from intrahost.sevmodel.client import ModelVm

_VMSA_PARTS: tuple[type[uapi.Struct], ...] = (
    uapi.kvm_regs,
    uapi.kvm_sregs,
    uapi.kvm_fpu,
    uapi.kvm_xcrs,
    uapi.kvm_debugregs,
)
VMSA_SIZE = sum(ctypes.sizeof(t) for t in _VMSA_PARTS)

#: The ioctls that fail with EINVAL on a vCPU whose register state is protected, on a VM with
#: protected state (x86.c: ``has_protected_state && guest_state_protected``).
PROTECTED_IOCTLS = frozenset(
    {
        K.KVM_GET_REGS,
        K.KVM_SET_REGS,
        K.KVM_GET_SREGS,
        K.KVM_SET_SREGS,
        K.KVM_GET_SREGS2,
        K.KVM_SET_SREGS2,
        K.KVM_GET_DEBUGREGS,
        K.KVM_SET_DEBUGREGS,
        K.KVM_GET_XCRS,
        K.KVM_SET_XCRS,
    }
)

#: The ioctls that fail with EINVAL on a vCPU whose FPU state is confidential, on a VM with
#: protected state (x86.c: ``has_protected_state && fpstate_is_confidential``).
CONFIDENTIAL_FPU_IOCTLS = frozenset(
    {K.KVM_GET_FPU, K.KVM_SET_FPU, K.KVM_GET_XSAVE, K.KVM_GET_XSAVE2, K.KVM_SET_XSAVE}
)

#: The getters among both sets (what a lax answer fills in).
_GETTERS = frozenset(
    {
        K.KVM_GET_REGS,
        K.KVM_GET_SREGS,
        K.KVM_GET_SREGS2,
        K.KVM_GET_DEBUGREGS,
        K.KVM_GET_XCRS,
        K.KVM_GET_FPU,
        K.KVM_GET_XSAVE,
        K.KVM_GET_XSAVE2,
    }
)


class AttachedVm(Vm):
    """A real KVM VM bound to a model SEV VM (``sev``); see the module docstring."""

    def __init__(self, fd: int, kvm: Kvm | None, sev: ModelVm) -> None:
        super().__init__(fd, kvm)
        self.sev = sev
        #: ``kvm->arch.has_protected_state``: the model VM's type decides (the real KVM VM
        #: is of the default type).
        self.has_protected_state = sev.vm_type.has_protected_state
        #: The vCPUs created on this VM, by index (the model VM numbers them the same way).
        self.vcpus: list[AttachedVcpu] = []
        self._dead = False

    def check_alive(self, ioctl: str, obj: str) -> None:
        """Raise ``EIO`` if the model VM is dead (its context was moved to another VM)."""
        if not self._dead and self.sev.fd >= 0:
            self._dead = self.sev.is_dead()
        if self._dead:
            raise KvmError(
                errno.EIO,
                ioctl,
                obj,
                "the VM is dead: its SEV context was moved to another VM (model platform)",
            )

    def _ioctl(self, request: int, name: str, arg: Any = 0) -> int:
        if not self.closed:
            self.check_alive(name, repr(self))
        return super()._ioctl(request, name, arg)

    def _vcpu_object(self, fd: int, vcpu_id: int, mmap_size: int) -> AttachedVcpu:
        vcpu = AttachedVcpu(fd, self, vcpu_id, mmap_size, index=len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu


class AttachedVcpu(Vcpu):
    """A vCPU of an :class:`AttachedVm`; see the module docstring."""

    def __init__(self, fd: int, vm: AttachedVm, vcpu_id: int, mmap_size: int, index: int) -> None:
        super().__init__(fd, vm, vcpu_id, mmap_size)
        self.attached_to = vm
        self.index = index
        #: Whether the register state belongs to the platform (set by the model VM after
        #: LAUNCH_UPDATE_VMSA and after a MOVE): ``guest_state_protected``.
        self.protected = False
        #: ``fpstate_is_confidential``: set by the model VM after LAUNCH_UPDATE_VMSA only.
        self.fpu_confidential = False
        #: The VMSA this vCPU was last loaded with or saved from: the real vCPU still holds
        #: exactly that state, so loading it again is skipped (and must be: KVM_SET_REGS
        #: between an I/O exit and the KVM_RUN that completes the instruction would corrupt
        #: the emulation).
        self._held: bytes | None = None
        self._own_access = False

    def _ioctl(self, request: int, name: str, arg: Any = 0) -> int:
        if not self.closed:
            self.attached_to.check_alive(name, repr(self))
        if not self._own_access and (
            (request in PROTECTED_IOCTLS and self.protected)
            or (request in CONFIDENTIAL_FPU_IOCTLS and self.fpu_confidential)
        ):
            if self.attached_to.has_protected_state:
                raise KvmError(
                    errno.EINVAL,
                    name,
                    repr(self),
                    "the vCPU's register state is protected (SEV-ES VM type)",
                )
            # A legacy-initialised SEV-ES VM: the kernel answers without the guest's state.
            if request in _GETTERS and not isinstance(arg, int):
                ctypes.memset(ctypes.addressof(arg), 0, ctypes.sizeof(arg))
            return 0
        if request == K.KVM_RUN:
            return self._run_in_model(request, name, arg)
        return super()._ioctl(request, name, arg)

    def _run_in_model(self, request: int, name: str, arg: Any) -> int:
        """KVM_RUN between ``vcpu_enter`` and ``vcpu_exit`` (step 3 of the module docstring).
        ``vcpu_enter`` fails as KVM_RUN would (its errno is raised as KVM_RUN's), and returns
        the VMSA only for a protected vCPU. That state is saved also after a run the kernel
        interrupted (EINTR, EAGAIN): the guest may have run before the interruption."""
        sev = self.attached_to.sev
        try:
            vmsa = sev.vcpu_enter(self.index)
        except SevError as err:
            raise KvmError(err.errno, name, repr(self), err.detail) from None
        saved: bytes | None = None
        try:
            if vmsa is not None and vmsa != self._held:
                self.load_vmsa(vmsa)
            try:
                result = super()._ioctl(request, name, arg)
            except KvmError as err:
                if vmsa is not None and err.errno in (errno.EINTR, errno.EAGAIN):
                    saved = self.capture_vmsa()
                raise
            if vmsa is not None:
                saved = self.capture_vmsa()
            return result
        finally:
            sev.vcpu_exit(self.index, saved)

    def capture_vmsa(self) -> bytes:
        """The real vCPU's register state as the model's VMSA blob."""
        self._own_access = True
        try:
            parts = (
                self.get_regs(),
                self.get_sregs(),
                self.get_fpu(),
                self.get_xcrs(),
                self.get_debugregs(),
            )
        finally:
            self._own_access = False
        self._held = b"".join(bytes(p) for p in parts)
        return self._held

    def load_vmsa(self, vmsa: bytes) -> None:
        """Load a VMSA blob into the real vCPU."""
        if len(vmsa) != VMSA_SIZE:
            raise KvmError(
                errno.EINVAL, "load VMSA", repr(self), f"{len(vmsa)} bytes, expected {VMSA_SIZE}"
            )
        values = []
        at = 0
        for t in _VMSA_PARTS:
            size = ctypes.sizeof(t)
            values.append(t.from_bytes(vmsa[at : at + size]))
            at += size
        regs, sregs, fpu, xcrs, debugregs = values
        self._own_access = True
        try:
            self.set_sregs(sregs)
            self.set_regs(regs)
            self.set_fpu(fpu)
            self.set_xcrs(xcrs)
            self.set_debugregs(debugregs)
        finally:
            self._own_access = False
        self._held = vmsa
