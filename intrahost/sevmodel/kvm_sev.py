"""The model of KVM's SEV code (``arch/x86/kvm/svm/sev.c``) and the parts of ``kvm_main.c``
that SEV depends on.

Everything here follows current mainline: the checks of every command in the kernel's order
with the kernel's errno, ``kvm->lock`` and the vCPU mutexes (killable where the kernel's are),
the per-VM ``migration_in_progress`` flag, the ASID allocator with its reclaim bitmap, the
misc cgroup charges, mirror VMs, registered regions and what MOVE transfers. Functions are
named after the kernel functions they model, so the two can be read side by side.

Kernel quirks (behaviour no selftest covers, found by reading the code) are followed too, and
each is named in a comment starting with ``QUIRK`` (and tested in ``tests/sev/test_sev_quirks.py``).

The model does not touch memory: pinning checks that the range is mapped writable in the
caller's address space and counts pages against RLIMIT_MEMLOCK, and the bytes to measure are
read by the client library in the caller's process.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from intrahost.sev.interface import (
    GHCB_VERSION_MAX,
    GHCB_VERSION_MIN,
    LAUNCH_MEASURE_BLOB_LEN,
    SEV_NR_MAX,
    SVM_SEV_FEAT_DEBUG_SWAP,
    SVM_SEV_FEAT_SNP_ACTIVE,
    FirmwareError,
    GuestState,
    SevCommand,
    VmType,
)
from intrahost.sevmodel.firmware import FirmwareFailure, FirmwareVersion, SecureProcessor
from intrahost.sevmodel.sync import ModelMutex, Task

PAGE_SIZE = 4096
PAGE_SHIFT = 12
ULONG_MAX = (1 << 64) - 1
#: ``INVALID_PAGE``: what the source's ``ghcb_gpa``/``vmsa_pa`` become after a move.
INVALID_PAGE = ULONG_MAX
#: ``SEV_FW_BLOB_MAX_SIZE``.
SEV_FW_BLOB_MAX_SIZE = 0x4000
GHCB_VERSION_DEFAULT = GHCB_VERSION_MAX
#: ``KVM_MAX_VCPUS`` / ``KVM_MAX_VCPU_IDS`` of x86.
KVM_MAX_VCPUS = 1024
KVM_MAX_VCPU_IDS = 4096

MISC_CG_RES_SEV = "sev"
MISC_CG_RES_SEV_ES = "sev_es"


class IoctlFailure(Exception):
    """What a modelled ioctl returns when it fails: ``-errno``, and ``kvm_sev_cmd.error``.
    (The service answers it to the client; the VMM never sees this type.)"""

    def __init__(
        self,
        err: int,
        detail: str,
        firmware_error: FirmwareError | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{errno.errorcode.get(err, err)}: {detail}")
        self.errno = err
        self.detail = detail
        self.firmware_error = firmware_error
        self.result = result or {}


class Caller(Protocol):
    """The process an operation comes from (the model's ``current``), as the service sees it."""

    @property
    def identity(self) -> tuple[int, int]:
        """Stands for ``current->mm``: (pid, process start time)."""

    @property
    def pid(self) -> int: ...

    def fd_is_sev_device(self, fd: int) -> bool:
        """Whether ``fd`` in the caller's fd table is a model ``/dev/sev``."""

    def range_mapped_writable(self, addr: int, size: int) -> bool:
        """Whether ``pin_user_pages(FOLL_WRITE)`` over the range would succeed."""

    def memlock_limit_pages(self) -> int | None:
        """RLIMIT_MEMLOCK in pages, or ``None`` if unlimited or the caller has CAP_IPC_LOCK."""


@dataclass(frozen=True)
class ModelConfig:
    """What a host looks like: CPUID 0x8000001F, module parameters, firmware."""

    max_sev_asid: int = 509
    min_sev_asid: int = 100
    cbit_position: int = 51
    sev_enabled: bool = True
    sev_es_enabled: bool = True
    sev_snp_enabled: bool = True
    supported_vmsa_features: int = SVM_SEV_FEAT_DEBUG_SWAP
    #: ``KVM_SEV_NR_MAX`` (104 since ``KVM_SEV_SNP_ENABLE_REQ_CERTS``; 103 before it): ids
    #: from here on are unknown commands.
    sev_nr_max: int = SEV_NR_MAX
    firmware: FirmwareVersion = field(default_factory=FirmwareVersion)
    #: misc cgroup ``misc.max`` values: {cgroup path: {"sev"|"sev_es": max}}.
    misc_max: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def sev_es_supported(self) -> bool:
        # sev_hardware_setup: no SEV-ES without SEV-ES ASIDs (min_sev_asid == 1).
        return self.sev_enabled and self.sev_es_enabled and self.min_sev_asid > 1

    @property
    def sev_snp_supported(self) -> bool:
        # sev_hardware_setup: SNP needs SEV-ES support (and, on a real host, SNP firmware).
        return self.sev_es_supported and self.sev_snp_enabled


# ------------------------------------------------------------------------------------------
# objects


@dataclass(eq=False)
class SevEsState:
    """``struct vcpu_sev_es_state`` plus the two VMCB control fields that move with it.

    The model treats the VMSA as an opaque blob (the VMM's register state); ``None`` is "no
    VMSA page" (a vCPU created before the VM was SEV-ES).
    """

    vmsa: bytes | None
    ghcb_gpa: int
    sw_scratch: int = 0
    ghcb_sa: bytes = b""
    received_first_sipi: bool = False

    def copy(self) -> SevEsState:
        return SevEsState(
            self.vmsa, self.ghcb_gpa, self.sw_scratch, self.ghcb_sa, self.received_first_sipi
        )


@dataclass(eq=False)
class StructKvmVcpu:
    """``struct kvm_vcpu``: what the model keeps of one vCPU."""

    index: int
    vcpu_id: int
    mutex: ModelMutex
    guest_state_protected: bool = False
    #: ``fpstate_is_confidential(&vcpu->arch.guest_fpu)``: set by LAUNCH_UPDATE_VMSA
    #: (``__sev_launch_update_vmsa``) and by nothing else; a MOVE does not set it on the
    #: destination's vCPUs (``sev_migrate_from``).
    fpu_confidential: bool = False
    sev_es: SevEsState | None = None

    @property
    def vmsa_valid(self) -> bool:
        """``VALID_PAGE(svm->vmcb->control.vmsa_pa)``."""
        return self.sev_es is not None and self.sev_es.vmsa is not None


@dataclass(eq=False)
class EncRegion:
    """``struct enc_region``: a pinned range of the *registering* process's memory."""

    uaddr: int
    size: int
    npages: int


@dataclass(eq=False)
class SevInfo:
    """``struct kvm_sev_info``."""

    active: bool = False
    es_active: bool = False
    need_init: bool = False
    asid: int = 0
    handle: int = 0
    fd: int = 0
    policy: int = 0
    pages_locked: int = 0
    regions: list[EncRegion] = field(default_factory=list)
    enc_context_owner: StructKvm | None = None
    mirror_vms: list[StructKvm] = field(default_factory=list)
    migration_in_progress: bool = False
    vmsa_features: int = 0
    ghcb_version: int = 0
    misc_cg: str | None = None
    #: ``snp_certs_enabled`` (``KVM_SEV_SNP_ENABLE_REQ_CERTS``).
    snp_certs_enabled: bool = False


@dataclass(eq=False)
class StructKvm:
    """``struct kvm`` with its ``kvm_sev_info``: what the model keeps of one VM."""

    vm_id: int
    vm_type: VmType
    creator: tuple[int, int]
    lock: ModelMutex
    sev: SevInfo = field(default_factory=SevInfo)
    vcpus: list[StructKvmVcpu] = field(default_factory=list)
    created_vcpus: int = 0
    users: int = 1
    dead: bool = False
    destroyed: bool = False
    #: Test hook: vCPU creation stops between its two ``kvm->lock`` sections while set.
    hold_vcpu_creation: bool = False

    @property
    def online_vcpus(self) -> int:
        return len(self.vcpus)

    @property
    def has_protected_state(self) -> bool:
        """``kvm->arch.has_protected_state`` (``svm_vm_init``: the SEV-ES and SNP types)."""
        return self.vm_type.has_protected_state

    def __repr__(self) -> str:
        return f"<vm {self.vm_id}>"


def sev_guest(vm: StructKvm) -> bool:
    return vm.sev.active


def sev_es_guest(vm: StructKvm) -> bool:
    return vm.sev.active and vm.sev.es_active


def sev_snp_guest(vm: StructKvm) -> bool:
    """``sev_snp_guest`` (``svm.h``): the SNP feature bit INIT2 set, on an SEV-ES guest."""
    return bool(vm.sev.vmsa_features & SVM_SEV_FEAT_SNP_ACTIVE) and sev_es_guest(vm)


def is_mirroring_enc_context(vm: StructKvm) -> bool:
    return vm.sev.enc_context_owner is not None


def is_cmd_allowed_from_mirror(cmd: int) -> bool:
    return cmd in (
        SevCommand.LAUNCH_UPDATE_VMSA,
        SevCommand.GUEST_STATUS,
        SevCommand.DBG_DECRYPT,
        SevCommand.DBG_ENCRYPT,
    )


def ghcb_msr_sev_info(max_version: int, min_version: int, cbit: int) -> int:
    """``GHCB_MSR_SEV_INFO``: the GHCB MSR value a vCPU starts with."""
    return ((max_version & 0xFFFF) << 48) | ((min_version & 0xFFFF) << 32) | (cbit << 24) | 1


# ------------------------------------------------------------------------------------------
# misc cgroup


class MiscCgroups:
    """The misc cgroup controller for the two SEV resources (``kernel/cgroup/misc.c``)."""

    def __init__(self, capacity: dict[str, int], limits: dict[str, dict[str, int]]) -> None:
        self.capacity = capacity
        self.limits = limits
        self.usage: dict[tuple[str, str], int] = {}
        #: WARN_ONCE messages (``misc cgroup resource ... became less than 0``).
        self.warnings: list[str] = []

    @staticmethod
    def _levels(cgroup: str) -> list[str]:
        parts = [p for p in cgroup.split("/") if p]
        return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]

    def try_charge(self, res: str, cgroup: str, amount: int = 1) -> None:
        if not self.capacity.get(res):
            raise IoctlFailure(errno.EINVAL, f"misc cgroup resource {res} has no capacity")
        for level in self._levels(cgroup):
            new = self.usage.get((level, res), 0) + amount
            limit = self.limits.get(level, {}).get(res)
            if new > self.capacity[res] or (limit is not None and new > limit):
                raise IoctlFailure(errno.EBUSY, f"misc cgroup {level} has no {res} ASID left")
        for level in self._levels(cgroup):
            self.usage[(level, res)] = self.usage.get((level, res), 0) + amount

    def uncharge(self, res: str, cgroup: str | None, amount: int = 1) -> None:
        if cgroup is None:
            # misc_cg_uncharge(type, NULL, amount) does nothing.
            return
        for level in self._levels(cgroup):
            new = self.usage.get((level, res), 0) - amount
            if new < 0:
                self.warnings.append(f"misc cgroup resource {res} became less than 0 in {level}")
            self.usage[(level, res)] = new


def _misc_res(sev: SevInfo) -> str:
    return MISC_CG_RES_SEV_ES if sev.es_active else MISC_CG_RES_SEV


# ------------------------------------------------------------------------------------------
# the model


class KvmModel:
    """KVM with SEV, for every VM of one platform service."""

    def __init__(
        self,
        config: ModelConfig,
        firmware: SecureProcessor,
        on_dead: Callable[[StructKvm], None] = lambda vm: None,
        on_destroyed: Callable[[StructKvm], None] = lambda vm: None,
    ) -> None:
        self.config = config
        self.fw = firmware
        self.on_dead = on_dead
        self.on_destroyed = on_destroyed
        #: The service's big lock: every model field is read and written under it.
        self.cond = threading.Condition(threading.RLock())
        self.vms: dict[int, StructKvm] = {}
        self._next_vm = 1
        self.asid_bitmap: set[int] = set()
        self.reclaim_asid_bitmap: set[int] = set()
        sev_count = max(0, config.max_sev_asid - config.min_sev_asid + 1)
        es_count = config.min_sev_asid - 1 if config.sev_es_supported else 0
        self.misc = MiscCgroups(
            {MISC_CG_RES_SEV: sev_count, MISC_CG_RES_SEV_ES: es_count}, config.misc_max
        )
        #: Kernel-internal work (VM destruction) runs as this never-killed task.
        self.kernel_task = Task("kernel")

    # -- VM lifetime ------------------------------------------------------------------------
    def create_vm(self, caller: Caller, vm_type: VmType | int) -> StructKvm:
        """``KVM_CREATE_VM``."""
        with self.cond:
            try:
                kind = VmType(vm_type)
            except ValueError:
                raise IoctlFailure(errno.EINVAL, f"unsupported VM type {vm_type}") from None
            if kind not in self.supported_vm_types():
                raise IoctlFailure(errno.EINVAL, f"VM type {kind.name} is not supported here")
            vm_id = self._next_vm
            self._next_vm += 1
            vm = StructKvm(
                vm_id=vm_id,
                vm_type=kind,
                creator=caller.identity,
                lock=ModelMutex(self.cond, f"vm{vm_id}.lock"),
            )
            # svm_vm_init: typed SEV VMs must be initialised with KVM_SEV_INIT2 before they run.
            vm.sev.need_init = kind in (VmType.SEV, VmType.SEV_ES, VmType.SNP)
            self.vms[vm_id] = vm
            return vm

    def supported_vm_types(self) -> tuple[VmType, ...]:
        types = [VmType.DEFAULT]
        if self.config.sev_enabled:
            types.append(VmType.SEV)
        if self.config.sev_es_supported:
            types.append(VmType.SEV_ES)
        if self.config.sev_snp_supported:
            types.append(VmType.SNP)
        return tuple(types)

    def kvm_get_kvm(self, vm: StructKvm) -> None:
        with self.cond:
            assert not vm.destroyed, f"{vm} used after destruction"
            vm.users += 1

    def kvm_put_kvm(self, vm: StructKvm) -> None:
        """Drop a reference; the last one destroys the VM (``kvm_destroy_vm``)."""
        with self.cond:
            vm.users -= 1
            assert vm.users >= 0, f"{vm} reference count underflow"
            if vm.users == 0:
                self._destroy_vm(vm)

    def _destroy_vm(self, vm: StructKvm) -> None:
        vm.destroyed = True
        self.sev_vm_destroy(vm)
        # kvm_destroy_vcpus -> sev_free_vcpu: nothing to do in the model (the VMSA blobs of a
        # moved-from source already belong to the destination).
        vm.vcpus.clear()
        del self.vms[vm.vm_id]
        self.on_destroyed(vm)

    def sev_vm_destroy(self, vm: StructKvm) -> None:
        sev = vm.sev
        if not sev_guest(vm):
            # Also a moved-from source: active is false, so nothing SEV-related is freed.
            return
        if sev.mirror_vms:
            self.misc.warnings.append(f"{vm} destroyed with mirrors {sev.mirror_vms}")
        if is_mirroring_enc_context(vm):
            owner = sev.enc_context_owner
            assert owner is not None
            owner.lock.lock(self.kernel_task, killable=False, owner=("destroy", vm.vm_id))
            owner.sev.mirror_vms.remove(vm)
            owner.lock.unlock(("destroy", vm.vm_id))
            self.kvm_put_kvm(owner)
            return
        self.fw.wbinvd()
        for region in list(sev.regions):
            self._unregister_enc_region_locked(vm, region)
        self.sev_unbind_asid(sev.handle)
        self.sev_asid_free(sev)

    # -- the generic ioctl gate --------------------------------------------------------------
    @staticmethod
    def _ioctl_gate(caller: Caller, vm: StructKvm) -> None:
        """``kvm_vm_ioctl``/``kvm_vcpu_ioctl``: -EIO if ``kvm->mm != current->mm`` or dead."""
        if vm.creator != caller.identity:
            raise IoctlFailure(
                errno.EIO,
                f"{vm} was created by process {vm.creator[0]}, not by the caller "
                f"(process {caller.pid})",
            )
        if vm.dead:
            raise IoctlFailure(errno.EIO, f"{vm} is dead: its encryption context was moved away")

    # -- ASIDs --------------------------------------------------------------------------------
    def sev_asid_new(self, sev: SevInfo, task: Task) -> None:
        cfg = self.config
        min_asid = 1 if sev.es_active else cfg.min_sev_asid
        max_asid = cfg.min_sev_asid - 1 if sev.es_active else cfg.max_sev_asid
        if min_asid > max_asid:
            raise IoctlFailure(errno.ENOTTY, "no ASIDs are set aside for this kind of guest")
        sev.misc_cg = task.cgroup
        try:
            self.misc.try_charge(_misc_res(sev), sev.misc_cg)
        except IoctlFailure:
            sev.misc_cg = None
            raise
        retry = True
        while True:
            free = [a for a in range(min_asid, max_asid + 1) if a not in self.asid_bitmap]
            if free:
                break
            if retry and self._sev_recycle_asids(min_asid, max_asid):
                retry = False
                continue
            self.misc.uncharge(_misc_res(sev), sev.misc_cg)
            sev.misc_cg = None
            kind = "SEV-ES" if sev.es_active else "SEV"
            raise IoctlFailure(errno.EBUSY, f"all {kind} ASIDs ({min_asid}..{max_asid}) are in use")
        sev.asid = free[0]
        self.asid_bitmap.add(sev.asid)

    def _sev_recycle_asids(self, min_asid: int, max_asid: int) -> bool:
        """``__sev_recycle_asids``: WBINVD + DF_FLUSH, then every reclaimed ASID is free."""
        if not any(min_asid <= a <= max_asid for a in self.reclaim_asid_bitmap):
            return False
        self.fw.wbinvd()
        try:
            self.fw.df_flush()
        except FirmwareFailure:
            return False
        self.asid_bitmap ^= self.reclaim_asid_bitmap
        self.reclaim_asid_bitmap.clear()
        return True

    def sev_asid_free(self, sev: SevInfo) -> None:
        # A freed ASID is reusable only after the next flush (see _sev_recycle_asids).
        self.reclaim_asid_bitmap.add(sev.asid)
        self.misc.uncharge(_misc_res(sev), sev.misc_cg)
        sev.misc_cg = None

    def sev_unbind_asid(self, handle: int) -> None:
        if not handle:
            return
        self.fw.deactivate(handle)
        self.fw.decommission(handle)

    # -- firmware access through /dev/sev ---------------------------------------------------
    def _sev_issue_cmd(self, caller: Caller, fd: int, what: str) -> None:
        """``__sev_issue_cmd``: the fd *number* is looked up in the caller's fd table."""
        if not caller.fd_is_sev_device(fd):
            detail = f"{what}: fd {fd} of process {caller.pid} is not an open /dev/sev"
            if fd == 0:
                detail += (
                    "; KVM records the /dev/sev fd number at LAUNCH_START and a move does not"
                    " carry it, so after a move it resolves fd 0 of the caller"
                )
            raise IoctlFailure(errno.EBADF, detail)

    def _fw(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except FirmwareFailure as failure:
            result = {"length": failure.length} if failure.length is not None else None
            raise IoctlFailure(errno.EIO, failure.why, failure.code, result) from None

    # -- pinning --------------------------------------------------------------------------------
    def sev_pin_memory(self, caller: Caller, vm: StructKvm, uaddr: int, ulen: int) -> int:
        """``sev_pin_memory``: returns the number of pages pinned (and accounted)."""
        if ulen == 0 or uaddr + ulen > ULONG_MAX + 1:
            raise IoctlFailure(errno.EINVAL, f"invalid range {uaddr:#x}+{ulen:#x}")
        first = uaddr >> PAGE_SHIFT
        last = (uaddr + ulen - 1) >> PAGE_SHIFT
        npages = last - first + 1
        locked = vm.sev.pages_locked + npages
        limit = caller.memlock_limit_pages()
        if limit is not None and locked > limit:
            raise IoctlFailure(
                errno.ENOMEM, f"{locked} locked pages exceed the lock limit of {limit}"
            )
        if not caller.range_mapped_writable(first << PAGE_SHIFT, npages * PAGE_SIZE):
            raise IoctlFailure(
                errno.ENOMEM, f"failure locking {npages} pages at {uaddr:#x} (not mapped)"
            )
        vm.sev.pages_locked = locked
        return npages

    @staticmethod
    def sev_unpin_memory(vm: StructKvm, npages: int) -> None:
        vm.sev.pages_locked -= npages

    # -- vCPUs --------------------------------------------------------------------------------
    def create_vcpu(self, task: Task, caller: Caller, vm: StructKvm, vcpu_id: int | None) -> int:
        """``kvm_vm_ioctl_create_vcpu``: returns the new vCPU's index."""
        with self.cond:
            self._ioctl_gate(caller, vm)
            vid = vm.created_vcpus if vcpu_id is None else vcpu_id
            if not 0 <= vid < KVM_MAX_VCPU_IDS:
                raise IoctlFailure(errno.EINVAL, f"vCPU id {vid} is out of range")
            vm.lock.lock(task, killable=False)
            try:
                if vm.created_vcpus >= KVM_MAX_VCPUS:
                    raise IoctlFailure(errno.EINVAL, "too many vCPUs")
                vm.created_vcpus += 1
            finally:
                vm.lock.unlock(task.holder)
            # kvm_arch_vcpu_create (outside kvm->lock): sev_vcpu_create / sev_es_init_vmcb,
            # and sev_es_vcpu_reset, which sets the GHCB MSR to GHCB_MSR_SEV_INFO with the VM's
            # ghcb_version as it is. QUIRK (kernel): that is 0 on a mirror (COPY does not copy
            # it) and on a MOVE destination (MOVE does not move it), so a vCPU created there
            # offers GHCB protocol versions 1..0; so does the GHCB MSR protocol's SEV_INFO
            # request (sev_handle_vmgexit_msr_protocol), see ghcb_sev_info.
            sev_es = None
            if sev_es_guest(vm):
                sev_es = SevEsState(vmsa=b"", ghcb_gpa=self.ghcb_sev_info(vm))
            while vm.hold_vcpu_creation:
                self.cond.wait()
            vm.lock.lock(task, killable=False)
            try:
                if any(v.vcpu_id == vid for v in vm.vcpus):
                    vm.created_vcpus -= 1
                    raise IoctlFailure(errno.EEXIST, f"vCPU id {vid} already exists")
                index = len(vm.vcpus)
                vm.vcpus.append(
                    StructKvmVcpu(
                        index=index,
                        vcpu_id=vid,
                        mutex=ModelMutex(self.cond, f"vm{vm.vm_id}.vcpu{index}.mutex"),
                        sev_es=sev_es,
                    )
                )
                return index
            finally:
                vm.lock.unlock(task.holder)

    def ghcb_sev_info(self, vm: StructKvm) -> int:
        """``GHCB_MSR_SEV_INFO(sev->ghcb_version, GHCB_VERSION_MIN, sev_enc_bit)``: what
        ``sev_es_vcpu_reset`` puts in a vCPU's GHCB MSR and what the GHCB MSR protocol answers
        a ``GHCB_MSR_SEV_INFO_REQ`` with. The VM's own ``ghcb_version``, with no fallback."""
        return ghcb_msr_sev_info(vm.sev.ghcb_version, GHCB_VERSION_MIN, self.config.cbit_position)

    def _vcpu(self, vm: StructKvm, index: int) -> StructKvmVcpu:
        if not 0 <= index < len(vm.vcpus):
            raise IoctlFailure(errno.EBADF, f"{vm} has no vCPU with index {index}")
        return vm.vcpus[index]

    def vcpu_enter(
        self, task: Task, caller: Caller, vm: StructKvm, index: int, holder: Hashable
    ) -> bytes | None:
        """The part of ``KVM_RUN`` before guest entry; the vCPU mutex stays held."""
        with self.cond:
            self._ioctl_gate(caller, vm)
            vcpu = self._vcpu(vm, index)
            if vcpu.mutex.owner == holder:
                raise IoctlFailure(errno.EDEADLK, f"vCPU {index} is already entered by this thread")
            if not vcpu.mutex.lock(task, killable=True, owner=holder):
                raise IoctlFailure(errno.EINTR, "interrupted while waiting for the vCPU mutex")
            try:
                if vm.dead:
                    # KVM_REQ_VM_DEAD: the VM died while we waited for the mutex.
                    raise IoctlFailure(errno.EIO, f"{vm} is dead: its context was moved away")
                if vm.sev.need_init:
                    # svm_vcpu_pre_run.
                    raise IoctlFailure(
                        errno.EINVAL, f"{vm} is a typed SEV VM that was never initialised"
                    )
                if sev_es_guest(vm) and not vcpu.vmsa_valid:
                    # pre_sev_run.
                    raise IoctlFailure(errno.EINVAL, f"vCPU {index} has no valid VMSA")
            except IoctlFailure:
                vcpu.mutex.unlock(holder)
                raise
            if vcpu.guest_state_protected:
                assert vcpu.sev_es is not None and vcpu.sev_es.vmsa is not None
                return vcpu.sev_es.vmsa
            return None

    def vcpu_exit(self, vm: StructKvm, index: int, holder: Hashable, vmsa: bytes | None) -> None:
        """The part of ``KVM_RUN`` after guest exit: save the protected state, unlock."""
        with self.cond:
            vcpu = self._vcpu(vm, index)
            if vcpu.mutex.owner != holder:
                raise IoctlFailure(errno.EPERM, f"vCPU {index} was not entered by this thread")
            if vcpu.guest_state_protected:
                if vmsa is None:
                    raise IoctlFailure(
                        errno.EINVAL, f"vCPU {index} is protected: its VMSA must be returned"
                    )
                assert vcpu.sev_es is not None
                vcpu.sev_es.vmsa = vmsa
            vcpu.mutex.unlock(holder)

    def vcpu_protected(self, caller: Caller, vm: StructKvm, index: int) -> bool:
        with self.cond:
            self._ioctl_gate(caller, vm)
            return self._vcpu(vm, index).guest_state_protected

    def release_holders(self, holders: Iterable[Hashable]) -> list[tuple[int, int]]:
        """A client went away while in ``KVM_RUN``: its vCPU mutexes are released."""
        gone = set(holders)
        released = []
        with self.cond:
            for vm in self.vms.values():
                for vcpu in vm.vcpus:
                    if vcpu.mutex.owner in gone:
                        assert vcpu.mutex.owner is not None
                        vcpu.mutex.unlock(vcpu.mutex.owner)
                        released.append((vm.vm_id, vcpu.index))
        return released

    def kvm_lock_all_vcpus(self, task: Task, vm: StructKvm) -> None:
        """``kvm_lock_all_vcpus``: every vCPU mutex, killably, in index order.

        On failure only the mutexes actually taken are released: the loop compares with the
        index that failed *before* unlocking. (V8 of the move series unlocked first and so
        also released the mutex it had failed to take; V9 fixed the order.)
        """
        failed_at = -1
        for i, vcpu in enumerate(vm.vcpus):
            if not vcpu.mutex.lock(task, killable=True):
                failed_at = i
                break
        if failed_at < 0:
            return
        for j, vcpu in enumerate(vm.vcpus):
            if j == failed_at:
                break
            vcpu.mutex.unlock(task.holder)
        raise IoctlFailure(errno.EINTR, f"interrupted while locking the vCPUs of {vm}")

    @staticmethod
    def kvm_unlock_all_vcpus(task: Task, vm: StructKvm) -> None:
        for vcpu in vm.vcpus:
            vcpu.mutex.unlock(task.holder)

    # -- KVM_MEMORY_ENCRYPT_OP ---------------------------------------------------------------
    def sev_mem_enc_ioctl(
        self,
        task: Task,
        caller: Caller,
        vm: StructKvm,
        cmd: int,
        data: dict[str, Any] | None,
        sev_fd: int,
    ) -> dict[str, Any]:
        """``KVM_MEMORY_ENCRYPT_OP``; ``data`` is the command's struct, ``None`` for NULL."""
        with self.cond:
            self._ioctl_gate(caller, vm)
            if not self.config.sev_enabled:
                raise IoctlFailure(errno.ENOTTY, "SEV is not enabled on this platform")
            vm.lock.lock(task, killable=False)
            try:
                if is_mirroring_enc_context(vm) and not is_cmd_allowed_from_mirror(cmd):
                    raise IoctlFailure(
                        errno.EINVAL, f"command {_cmd_name(cmd)} is not allowed on a mirror VM"
                    )
                # Once KVM_SEV_INIT2 made the VM an SNP guest, only the SNP commands are
                # allowed (sev_mem_enc_ioctl), before the command id is even looked at.
                if sev_snp_guest(vm) and cmd < SevCommand.SNP_LAUNCH_START:
                    raise IoctlFailure(
                        errno.EPERM,
                        f"{vm} is an SEV-SNP guest: {_cmd_name(cmd)} is not an SNP command",
                    )
                handler = self._handlers().get(cmd) if cmd < self.config.sev_nr_max else None
                if handler is None:
                    raise IoctlFailure(errno.EINVAL, f"unknown SEV command {cmd}")
                return handler(task, caller, vm, data, sev_fd)
            finally:
                vm.lock.unlock(task.holder)

    _Handler = Callable[[Task, Caller, StructKvm, "dict[str, Any] | None", int], "dict[str, Any]"]

    def _handlers(self) -> dict[int, KvmModel._Handler]:
        c = SevCommand
        return {
            c.ES_INIT: self._es_init,
            c.INIT: self.sev_guest_init,
            c.INIT2: self.sev_guest_init2,
            c.LAUNCH_START: self.sev_launch_start,
            c.LAUNCH_UPDATE_DATA: self.sev_launch_update_data,
            c.LAUNCH_UPDATE_VMSA: self.sev_launch_update_vmsa,
            c.LAUNCH_MEASURE: self.sev_launch_measure,
            c.LAUNCH_FINISH: self.sev_launch_finish,
            c.GUEST_STATUS: self.sev_guest_status,
            c.DBG_DECRYPT: self.sev_dbg_crypt,
            c.DBG_ENCRYPT: self.sev_dbg_crypt,
            c.LAUNCH_SECRET: self.sev_launch_secret,
            c.GET_ATTESTATION_REPORT: self._not_modelled(errno.ENOTTY),
            c.SEND_START: self._not_modelled(errno.ENOTTY),
            c.SEND_UPDATE_DATA: self._not_modelled(errno.ENOTTY),
            c.SEND_FINISH: self._state_only(GuestState.SUPDATE, "SEND_FINISH"),
            c.SEND_CANCEL: self._state_only(GuestState.SUPDATE, "SEND_CANCEL"),
            c.RECEIVE_START: self._not_modelled(errno.ENOTTY),
            # QUIRK (kernel): sev_receive_update_data answers a non-SEV VM with -EINVAL where
            # every other handler says -ENOTTY.
            c.RECEIVE_UPDATE_DATA: self._not_modelled(errno.EINVAL),
            c.RECEIVE_FINISH: self._state_only(GuestState.RUPDATE, "RECEIVE_FINISH"),
            c.SNP_LAUNCH_START: self._snp(errno.ENOTTY),
            c.SNP_LAUNCH_UPDATE: self._snp(errno.EINVAL),
            c.SNP_LAUNCH_FINISH: self._snp(errno.ENOTTY),
            c.SNP_ENABLE_REQ_CERTS: self.snp_enable_certs,
        }

    def _es_init(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not self.config.sev_es_supported:
            raise IoctlFailure(errno.ENOTTY, "SEV-ES is not enabled on this platform")
        return self._sev_guest_init(task, vm, SevCommand.ES_INIT)

    def sev_guest_init(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        return self._sev_guest_init(task, vm, SevCommand.INIT)

    def _sev_guest_init(self, task: Task, vm: StructKvm, cmd: SevCommand) -> dict[str, Any]:
        if vm.vm_type != VmType.DEFAULT:
            raise IoctlFailure(
                errno.EINVAL, f"{cmd.name} is for default-type VMs; use INIT2 on {vm.vm_type.name}"
            )
        vm_type = VmType.SEV if cmd == SevCommand.INIT else VmType.SEV_ES
        # KVM_SEV_ES_INIT only ever supports the minimal GHCB protocol version.
        ghcb = GHCB_VERSION_MIN if vm_type == VmType.SEV_ES else 0
        self.__sev_guest_init(task, vm, 0, 0, ghcb, vm_type)
        return {}

    def sev_guest_init2(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not vm.sev.need_init:
            raise IoctlFailure(errno.EINVAL, "INIT2 needs a typed SEV VM that is not initialised")
        if vm.vm_type not in (VmType.SEV, VmType.SEV_ES, VmType.SNP):
            raise IoctlFailure(errno.EINVAL, "INIT2 is for the SEV, SEV-ES and SNP VM types")
        if data is None:
            raise IoctlFailure(errno.EFAULT, "INIT2 needs a struct kvm_sev_init")
        self.__sev_guest_init(
            task,
            vm,
            int(data.get("flags", 0)),
            int(data.get("vmsa_features", 0)),
            int(data.get("ghcb_version", 0)),
            vm.vm_type,
        )
        return {}

    def __sev_guest_init(
        self, task: Task, vm: StructKvm, flags: int, vmsa_features: int, ghcb: int, vm_type: VmType
    ) -> None:
        sev = vm.sev
        es_active = vm_type != VmType.SEV
        valid_features = self.config.supported_vmsa_features if es_active else 0
        if vm.created_vcpus:
            raise IoctlFailure(errno.EINVAL, "SEV must be initialised before vCPUs are created")
        if flags:
            raise IoctlFailure(errno.EINVAL, f"unknown flags {flags:#x}")
        if vmsa_features & ~valid_features:
            raise IoctlFailure(errno.EINVAL, f"unsupported VMSA features {vmsa_features:#x}")
        if ghcb > GHCB_VERSION_MAX or (not es_active and ghcb):
            raise IoctlFailure(errno.EINVAL, f"unsupported GHCB version {ghcb}")
        if sev.active:
            raise IoctlFailure(errno.EINVAL, f"{vm} is already an SEV guest")
        sev.active = True
        sev.es_active = es_active
        sev.vmsa_features = vmsa_features
        sev.ghcb_version = ghcb or (GHCB_VERSION_DEFAULT if es_active else 0)
        if vm_type == VmType.SNP:
            sev.vmsa_features |= SVM_SEV_FEAT_SNP_ACTIVE
        try:
            self.sev_asid_new(sev, task)
        except IoctlFailure:
            sev.vmsa_features = 0
            sev.es_active = False
            sev.active = False
            raise
        self.fw.init()
        sev.regions = []
        sev.mirror_vms = []
        sev.need_init = False

    def _launch_payload(self, data: dict[str, Any] | None, what: str) -> dict[str, Any]:
        if data is None:
            raise IoctlFailure(errno.EFAULT, f"{what} needs its parameter struct")
        return data

    def sev_launch_start(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        sev = vm.sev
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        params = self._launch_payload(data, "LAUNCH_START")
        policy = int(params.get("policy", 0))
        sev.policy = policy
        dh_cert = bytes(params.get("dh_cert", b""))
        session = bytes(params.get("session", b""))
        for name, blob in (("dh_cert", dh_cert), ("session", session)):
            if len(blob) > SEV_FW_BLOB_MAX_SIZE:
                raise IoctlFailure(errno.EINVAL, f"{name} is larger than {SEV_FW_BLOB_MAX_SIZE}")
        # Unlike every later command, LAUNCH_START uses the sev_fd passed with this call.
        self._sev_issue_cmd(caller, sev_fd, "LAUNCH_START")
        handle: int = self._fw(
            lambda: self.fw.launch_start(int(params.get("handle", 0)), policy, dh_cert, session)
        )
        try:
            self._fw(lambda: self.fw.activate(handle, sev.asid))
        except IoctlFailure:
            self.fw.decommission(handle)
            raise
        sev.handle = handle
        sev.fd = sev_fd
        return {"handle": handle}

    def sev_launch_update_data(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        params = self._launch_payload(data, "LAUNCH_UPDATE_DATA")
        uaddr, length = int(params.get("uaddr", 0)), int(params.get("len", 0))
        npages = self.sev_pin_memory(caller, vm, uaddr, length)
        try:
            self._sev_issue_cmd(caller, vm.sev.fd, "LAUNCH_UPDATE_DATA")
            content = bytes(params.get("bytes", b""))
            if len(content) != length:
                raise IoctlFailure(errno.EFAULT, f"could not read {length} bytes at {uaddr:#x}")
            self._fw(lambda: self.fw.launch_update_data(vm.sev.handle, uaddr, content))
        finally:
            self.sev_unpin_memory(vm, npages)
        return {}

    def sev_launch_update_vmsa(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_es_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV-ES guest")
        vmsas: list[bytes] | None = None
        if data is not None and data.get("vmsas") is not None:
            vmsas = [bytes(v) for v in data["vmsas"]]
            if len(vmsas) != len(vm.vcpus):
                raise IoctlFailure(
                    errno.EINVAL, f"{len(vmsas)} VMSAs given for {len(vm.vcpus)} vCPUs"
                )
        for vcpu in vm.vcpus:
            if not vcpu.mutex.lock(task, killable=True):
                raise IoctlFailure(errno.EINTR, "interrupted while waiting for a vCPU mutex")
            try:
                self.__sev_launch_update_vmsa(caller, vm, vcpu, vmsas)
            finally:
                vcpu.mutex.unlock(task.holder)
        return {}

    def __sev_launch_update_vmsa(
        self, caller: Caller, vm: StructKvm, vcpu: StructKvmVcpu, vmsas: list[bytes] | None
    ) -> None:
        assert vcpu.sev_es is not None, "vCPUs of an SEV-ES VM have a VMSA"
        # sev_es_sync_vmsa: the VMSA becomes the vCPU's current register state. QUIRK
        # (kernel): nothing checks guest_state_protected, so a second LAUNCH_UPDATE_VMSA is
        # accepted and measured again (the current selftest issues it twice for SEV-ES).
        vmsa = vmsas[vcpu.index] if vmsas is not None else (vcpu.sev_es.vmsa or b"")
        vcpu.sev_es.vmsa = vmsa
        self._sev_issue_cmd(caller, vm.sev.fd, "LAUNCH_UPDATE_VMSA")
        self._fw(lambda: self.fw.launch_update_vmsa(vm.sev.handle, vmsa))
        # fpstate_set_confidential, then guest_state_protected.
        vcpu.fpu_confidential = True
        vcpu.guest_state_protected = True

    def sev_launch_measure(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        params = self._launch_payload(data, "LAUNCH_MEASURE")
        length = int(params.get("len", 0))
        if length > SEV_FW_BLOB_MAX_SIZE:
            raise IoctlFailure(
                errno.EINVAL, f"length {length} is larger than {SEV_FW_BLOB_MAX_SIZE}"
            )
        self._sev_issue_cmd(caller, vm.sev.fd, "LAUNCH_MEASURE")
        blob: bytes = self._fw(lambda: self.fw.launch_measure(vm.sev.handle, length))
        return {"len": LAUNCH_MEASURE_BLOB_LEN, "blob": blob}

    def sev_launch_secret(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        params = self._launch_payload(data, "LAUNCH_SECRET")
        guest_uaddr, guest_len = int(params.get("guest_uaddr", 0)), int(params.get("guest_len", 0))
        header = bytes(params.get("hdr", b""))
        trans = bytes(params.get("trans", b""))
        npages = self.sev_pin_memory(caller, vm, guest_uaddr, guest_len)
        try:
            for name, blob in (("transport data", trans), ("packet header", header)):
                if not blob or len(blob) > SEV_FW_BLOB_MAX_SIZE:
                    raise IoctlFailure(errno.EINVAL, f"invalid {name} length {len(blob)}")
            self._sev_issue_cmd(caller, vm.sev.fd, "LAUNCH_SECRET")
            self._fw(lambda: self.fw.launch_secret(vm.sev.handle, header, trans, guest_len))
        finally:
            self.sev_unpin_memory(vm, npages)
        return {}

    def sev_launch_finish(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        self._sev_issue_cmd(caller, vm.sev.fd, "LAUNCH_FINISH")
        self._fw(lambda: self.fw.launch_finish(vm.sev.handle))
        return {}

    def sev_guest_status(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        self._sev_issue_cmd(caller, vm.sev.fd, "GUEST_STATUS")
        policy, state, _asid = self._fw(lambda: self.fw.guest_status(vm.sev.handle))
        if data is None:
            raise IoctlFailure(errno.EFAULT, "GUEST_STATUS needs a struct to write to")
        return {"handle": vm.sev.handle, "policy": policy, "state": int(state)}

    def sev_dbg_crypt(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        if not sev_guest(vm):
            raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
        params = self._launch_payload(data, "DBG_DECRYPT/DBG_ENCRYPT")
        length, src, dst = (int(params.get(k, 0)) for k in ("len", "src_uaddr", "dst_uaddr"))
        if not length or src + length > ULONG_MAX or not dst:
            raise IoctlFailure(errno.EINVAL, "invalid debug range")
        self._sev_issue_cmd(caller, vm.sev.fd, "DBG")
        self._fw(lambda: self.fw.debug_allowed(vm.sev.handle))
        raise IoctlFailure(errno.EOPNOTSUPP, "the model does not implement DBG_DECRYPT/DBG_ENCRYPT")

    def _not_modelled(self, not_sev_errno: int) -> KvmModel._Handler:
        def handler(
            task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
        ) -> dict[str, Any]:
            if not sev_guest(vm):
                raise IoctlFailure(not_sev_errno, f"{vm} is not an SEV guest")
            if data is None:
                raise IoctlFailure(errno.EFAULT, "the command needs its parameter struct")
            raise IoctlFailure(errno.EOPNOTSUPP, "the model does not implement this command")

        return handler

    def _state_only(self, state: GuestState, name: str) -> KvmModel._Handler:
        def handler(
            task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
        ) -> dict[str, Any]:
            if not sev_guest(vm):
                raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
            self._sev_issue_cmd(caller, vm.sev.fd, name)
            self._fw(lambda: self.fw.require_state(vm.sev.handle, state, name))
            raise IoctlFailure(errno.EOPNOTSUPP, f"the model does not implement {name}")

        return handler

    @staticmethod
    def _snp(not_snp_errno: int) -> KvmModel._Handler:
        """SNP_LAUNCH_START/UPDATE/FINISH: refused on a VM that is not an SNP guest, with the
        handler's own errno (``snp_launch_start``/``_finish`` ENOTTY, ``snp_launch_update``
        EINVAL); on an SNP guest the model stops at the payload (it has no SNP launch)."""

        def handler(
            task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
        ) -> dict[str, Any]:
            if not sev_snp_guest(vm):
                raise IoctlFailure(not_snp_errno, f"{vm} is not an SEV-SNP guest")
            if data is None:
                raise IoctlFailure(errno.EFAULT, "the command needs its parameter struct")
            raise IoctlFailure(errno.EOPNOTSUPP, "the model does not implement the SNP launch")

        return handler

    def snp_enable_certs(
        self, task: Task, caller: Caller, vm: StructKvm, data: dict[str, Any] | None, sev_fd: int
    ) -> dict[str, Any]:
        """``KVM_SEV_SNP_ENABLE_REQ_CERTS`` (``snp_enable_certs``, Linux 6.20)."""
        if vm.created_vcpus or not sev_snp_guest(vm):
            raise IoctlFailure(
                errno.EINVAL, "ENABLE_REQ_CERTS needs an SNP guest without vCPUs yet"
            )
        vm.sev.snp_certs_enabled = True
        return {}

    # -- regions ------------------------------------------------------------------------------
    def sev_mem_enc_register_region(
        self, task: Task, caller: Caller, vm: StructKvm, addr: int, size: int
    ) -> None:
        with self.cond:
            self._ioctl_gate(caller, vm)
            if not sev_guest(vm):
                raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
            if is_mirroring_enc_context(vm):
                raise IoctlFailure(errno.EINVAL, f"{vm} is a mirror: its owner registers memory")
            if addr > ULONG_MAX or size > ULONG_MAX:
                raise IoctlFailure(errno.EINVAL, "address or size out of range")
            vm.lock.lock(task, killable=False)
            try:
                npages = self.sev_pin_memory(caller, vm, addr, size)
                vm.sev.regions.append(EncRegion(addr, size, npages))
            finally:
                vm.lock.unlock(task.holder)

    def sev_mem_enc_unregister_region(
        self, task: Task, caller: Caller, vm: StructKvm, addr: int, size: int
    ) -> None:
        with self.cond:
            self._ioctl_gate(caller, vm)
            # Note the order differs from REG_REGION: mirror first, then SEV-ness under the lock.
            if is_mirroring_enc_context(vm):
                raise IoctlFailure(errno.EINVAL, f"{vm} is a mirror: its owner registers memory")
            vm.lock.lock(task, killable=False)
            try:
                if not sev_guest(vm):
                    raise IoctlFailure(errno.ENOTTY, f"{vm} is not an SEV guest")
                region = next(
                    (r for r in vm.sev.regions if r.uaddr == addr and r.size == size), None
                )
                if region is None:
                    raise IoctlFailure(errno.EINVAL, f"no region {addr:#x}+{size:#x} is registered")
                self.fw.wbinvd()
                self._unregister_enc_region_locked(vm, region)
            finally:
                vm.lock.unlock(task.holder)

    def _unregister_enc_region_locked(self, vm: StructKvm, region: EncRegion) -> None:
        self.sev_unpin_memory(vm, region.npages)
        vm.sev.regions.remove(region)

    # -- MOVE and COPY ----------------------------------------------------------------------
    def sev_lock_two_vms(self, task: Task, dst: StructKvm, src: StructKvm) -> None:
        """Flags first (EBUSY instead of an ABBA deadlock), then both ``kvm->lock``s."""
        if dst is src:
            raise IoctlFailure(errno.EINVAL, "source and destination are the same VM")
        if dst.sev.migration_in_progress:
            raise IoctlFailure(errno.EBUSY, f"destination {dst} is already in a move or copy")
        dst.sev.migration_in_progress = True
        if src.sev.migration_in_progress:
            dst.sev.migration_in_progress = False
            raise IoctlFailure(errno.EBUSY, f"source {src} is already in a move or copy")
        src.sev.migration_in_progress = True
        self._preemption_point()
        if not dst.lock.lock(task, killable=True):
            src.sev.migration_in_progress = False
            dst.sev.migration_in_progress = False
            raise IoctlFailure(errno.EINTR, f"interrupted while waiting for {dst}'s lock")
        if not src.lock.lock(task, killable=True):
            dst.lock.unlock(task.holder)
            src.sev.migration_in_progress = False
            dst.sev.migration_in_progress = False
            raise IoctlFailure(errno.EINTR, f"interrupted while waiting for {src}'s lock")

    def _preemption_point(self) -> None:
        """Let other requests run here, as the kernel may be preempted at this point.

        The model's operations are otherwise atomic between waits, so without this the flag
        collisions (EBUSY) the kernel sees under contention would never happen.
        """
        self.cond.wait(timeout=1e-6)

    def sev_unlock_two_vms(self, task: Task, dst: StructKvm, src: StructKvm) -> None:
        dst.lock.unlock(task.holder)
        src.lock.unlock(task.holder)
        dst.sev.migration_in_progress = False
        src.sev.migration_in_progress = False
        self.cond.notify_all()

    def sev_check_source_vcpus(self, dst: StructKvm, src: StructKvm) -> None:
        if src.created_vcpus != src.online_vcpus or dst.created_vcpus != dst.online_vcpus:
            raise IoctlFailure(errno.EBUSY, "a vCPU is being created on one of the VMs")
        if not sev_es_guest(src):
            return
        if src.online_vcpus != dst.online_vcpus:
            raise IoctlFailure(
                errno.EINVAL,
                f"SEV-ES: the destination has {dst.online_vcpus} vCPUs, the source "
                f"{src.online_vcpus}",
            )
        for vcpu in src.vcpus:
            if not vcpu.guest_state_protected:
                raise IoctlFailure(
                    errno.EINVAL,
                    f"SEV-ES: source vCPU {vcpu.index} was never launched (LAUNCH_UPDATE_VMSA)",
                )

    def sev_migrate_from(self, dst_vm: StructKvm, src_vm: StructKvm) -> None:
        """Move the context: the kernel objects change hands, no firmware command runs."""
        dst, src = dst_vm.sev, src_vm.sev
        dst.active = True
        dst.asid = src.asid
        dst.handle = src.handle
        dst.pages_locked = src.pages_locked
        dst.enc_context_owner = src.enc_context_owner
        dst.es_active = src.es_active
        dst.vmsa_features = src.vmsa_features
        # QUIRK (kernel): sev->fd (the /dev/sev fd *number* recorded at LAUNCH_START) is not
        # moved. Later commands on the destination that go through it resolve fd 0 in the
        # caller's fd table and fail with EBADF unless that happens to be /dev/sev. Nor are
        # policy, ghcb_version and need_init moved (see vcpu_enter for need_init).

        src.asid = 0
        src.active = False
        src.handle = 0
        src.pages_locked = 0
        src.enc_context_owner = None
        src.es_active = False

        # QUIRK (kernel): the regions keep their uaddr, an address in the *source* process.
        dst.regions = src.regions
        src.regions = []

        # Each mirror's reference on the source becomes one on the destination.
        dst.mirror_vms = src.mirror_vms
        src.mirror_vms = []
        for mirror in dst.mirror_vms:
            self.kvm_get_kvm(dst_vm)
            self.kvm_put_kvm(src_vm)
            mirror.sev.enc_context_owner = dst_vm

        # A moved mirror stays a mirror of the same owner.
        owner = dst.enc_context_owner
        if owner is not None:
            owner.sev.mirror_vms.remove(src_vm)
            owner.sev.mirror_vms.append(dst_vm)

        for i, dst_vcpu in enumerate(dst_vm.vcpus):
            # sev_init_vmcb(dst_svm): nothing to model beyond the SEV-ES state below.
            if not dst.es_active:
                continue
            # Pairing is by index only: vcpu_id equality is not checked.
            src_vcpu = src_vm.vcpus[i]
            assert src_vcpu.sev_es is not None
            dst_vcpu.sev_es = src_vcpu.sev_es.copy()
            dst_vcpu.guest_state_protected = True
            src_vcpu.sev_es = None
            src_vcpu.guest_state_protected = False

    def kvm_vm_dead(self, vm: StructKvm) -> None:
        vm.dead = True
        self.on_dead(vm)

    def sev_vm_move_enc_context_from(
        self, task: Task, caller: Caller, dst: StructKvm, src: StructKvm | None
    ) -> None:
        """``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`` issued on ``dst``; ``src`` is None for EBADF."""
        with self.cond:
            self._ioctl_gate(caller, dst)
            if src is None:
                raise IoctlFailure(errno.EBADF, "the source fd is not an open VM fd")
            self.sev_lock_two_vms(task, dst, src)
            try:
                # One combined check, one errno. The SNP refusal is "KVM: SEV: Do not allow
                # intra-host migration/mirroring of SNP VMs" (merged 2026, in stable 6.12.97,
                # 6.18.40 and 7.1.5): SNP state (guest request buffers, the SNP context) is not
                # moved, so before it an SNP guest moved into an SNP VM half-worked.
                if (
                    dst.vm_type != src.vm_type
                    or sev_guest(dst)
                    or not sev_guest(src)
                    or sev_snp_guest(src)
                ):
                    raise IoctlFailure(errno.EINVAL, _move_refusal(dst, src))
                src_sev, dst_sev = src.sev, dst.sev
                dst_sev.misc_cg = task.cgroup
                cg_cleanup = dst_sev
                charged = False
                try:
                    if dst_sev.misc_cg != src_sev.misc_cg:
                        # QUIRK (kernel): the resource is chosen from es_active at call time:
                        # the destination is charged while its es_active is still false (SEV)
                        # and the source uncharged after it was cleared (SEV again), even for
                        # an SEV-ES guest.
                        self.misc.try_charge(_misc_res(dst_sev), dst_sev.misc_cg)
                        charged = True
                    self.kvm_lock_all_vcpus(task, dst)
                    try:
                        self.kvm_lock_all_vcpus(task, src)
                        try:
                            self.sev_check_source_vcpus(dst, src)
                            self.sev_migrate_from(dst, src)
                            self.kvm_vm_dead(src)
                            cg_cleanup = src_sev
                        finally:
                            self.kvm_unlock_all_vcpus(task, src)
                    finally:
                        self.kvm_unlock_all_vcpus(task, dst)
                finally:
                    # On the source on success, on the destination on failure.
                    # QUIRK (kernel): a mirror's misc_cg is NULL (COPY never sets it), so moving
                    # a mirror charges the destination's cgroup (NULL != current cgroup) and
                    # the success path "uncharges" the NULL source cgroup, which does nothing:
                    # one SEV charge leaks per move of a freshly copied mirror.
                    if charged:
                        self.misc.uncharge(_misc_res(cg_cleanup), cg_cleanup.misc_cg)
                    cg_cleanup.misc_cg = None
            finally:
                self.sev_unlock_two_vms(task, dst, src)

    def sev_vm_copy_enc_context_from(
        self, task: Task, caller: Caller, dst: StructKvm, src: StructKvm | None
    ) -> None:
        """``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``: ``dst`` becomes a mirror of ``src``."""
        with self.cond:
            self._ioctl_gate(caller, dst)
            if src is None:
                raise IoctlFailure(errno.EBADF, "the source fd is not an open VM fd")
            self.sev_lock_two_vms(task, dst, src)
            try:
                # The SNP refusal: the same patch as in sev_vm_move_enc_context_from (a mirror
                # would not get the SNP VMSA features, so it would run an SNP ASID as SEV).
                if (
                    sev_guest(dst)
                    or not sev_guest(src)
                    or sev_snp_guest(src)
                    or is_mirroring_enc_context(src)
                    or dst.created_vcpus
                ):
                    raise IoctlFailure(errno.EINVAL, _copy_refusal(dst, src))
                self.kvm_get_kvm(src)
                src.sev.mirror_vms.append(dst)
                mirror = dst.sev
                mirror.enc_context_owner = src
                mirror.active = True
                mirror.asid = src.sev.asid
                mirror.fd = src.sev.fd
                mirror.es_active = src.sev.es_active
                mirror.need_init = False
                mirror.handle = src.sev.handle
                mirror.regions = []
                mirror.mirror_vms = []
            finally:
                self.sev_unlock_two_vms(task, dst, src)

    # -- introspection -------------------------------------------------------------------------
    def inspect(self, vm: StructKvm) -> dict[str, Any]:
        """The model's view of a VM (no kernel equivalent; for tests and diagnostics)."""
        with self.cond:
            sev = vm.sev
            owner = sev.enc_context_owner
            return {
                "vm": vm.vm_id,
                "type": vm.vm_type.name,
                "has_protected_state": vm.has_protected_state,
                "creator_pid": vm.creator[0],
                "dead": vm.dead,
                "users": vm.users,
                "lock_owner": _owner_name(vm.lock.owner),
                "created_vcpus": vm.created_vcpus,
                "vcpus": [
                    {
                        "index": v.index,
                        "id": v.vcpu_id,
                        "protected": v.guest_state_protected,
                        "fpu_confidential": v.fpu_confidential,
                        "mutex_owner": _owner_name(v.mutex.owner),
                        "has_vmsa": v.vmsa_valid,
                        "vmsa": v.sev_es.vmsa if v.sev_es is not None else None,
                        "ghcb_gpa": v.sev_es.ghcb_gpa if v.sev_es is not None else INVALID_PAGE,
                    }
                    for v in vm.vcpus
                ],
                "sev": {
                    "active": sev.active,
                    "es_active": sev.es_active,
                    "need_init": sev.need_init,
                    "asid": sev.asid,
                    "handle": sev.handle,
                    "fd": sev.fd,
                    "policy": sev.policy,
                    "pages_locked": sev.pages_locked,
                    "regions": [[r.uaddr, r.size] for r in sev.regions],
                    "owner": owner.vm_id if owner is not None else None,
                    "mirrors": [m.vm_id for m in sev.mirror_vms],
                    "migration_in_progress": sev.migration_in_progress,
                    "vmsa_features": sev.vmsa_features,
                    "ghcb_version": sev.ghcb_version,
                    "snp": sev_snp_guest(vm),
                    "snp_certs_enabled": sev.snp_certs_enabled,
                    "misc_cg": sev.misc_cg,
                },
            }

    def platform_state(self) -> dict[str, Any]:
        with self.cond:
            return {
                "asids_in_use": sorted(self.asid_bitmap),
                "asids_to_reclaim": sorted(self.reclaim_asid_bitmap),
                "firmware_guests": sorted(self.fw.guests),
                "firmware_asids_to_flush": sorted(self.fw.asids_to_flush),
                "misc_usage": {f"{cg}:{res}": n for (cg, res), n in self.misc.usage.items()},
                "warnings": list(self.misc.warnings),
                "vms": sorted(self.vms),
            }


def _cmd_name(cmd: int) -> str:
    try:
        return SevCommand(cmd).name
    except ValueError:
        return str(cmd)


def _owner_name(owner: Hashable | None) -> str | None:
    if owner is None:
        return None
    if isinstance(owner, Task):
        return owner.name
    return repr(owner)


def _move_refusal(dst: StructKvm, src: StructKvm) -> str:
    if dst.vm_type != src.vm_type:
        return f"the VM types differ (destination {dst.vm_type.name}, source {src.vm_type.name})"
    if sev_guest(dst):
        return "the destination is already an SEV guest; moves need a fresh destination VM"
    if sev_snp_guest(src):
        return "the source is an SEV-SNP guest: KVM does not move SNP contexts"
    return "the source is not an SEV guest (never initialised, or its context was moved away)"


def _copy_refusal(dst: StructKvm, src: StructKvm) -> str:
    if sev_guest(dst):
        return "the destination is already an SEV guest"
    if not sev_guest(src):
        return "the source is not an SEV guest"
    if sev_snp_guest(src):
        return "the source is an SEV-SNP guest: KVM does not mirror SNP contexts"
    if is_mirroring_enc_context(src):
        return "the source is itself a mirror (mirrors of mirrors are refused)"
    return "the destination already has vCPUs; create a mirror's vCPUs after the copy"
