"""The kernel platform: SEV and SEV-ES through the real ``/dev/kvm`` and ``/dev/sev``.

Every SEV command is ``KVM_MEMORY_ENCRYPT_OP`` on the VM fd with a ``kvm_sev_cmd`` whose
``data`` is the address of the command's own struct (``intrahost.kvm.uapi``) and whose
``sev_fd`` is this process's open ``/dev/sev``; MOVE and COPY are ``KVM_ENABLE_CAP`` on the
destination with the source VM fd in ``args[0]``. The kernel does every check itself, so this
module adds none of its own: each failure is the kernel's errno, raised as a
:class:`~intrahost.sev.interface.SevError` together with the firmware status the kernel wrote
back into ``kvm_sev_cmd.error``.

Structs and every buffer they point to are ctypes objects held in local variables of the
method that issues the ioctl, so they stay alive (and in place) for the whole call.

Three ways to get a :class:`KernelSevVm`:

* :meth:`KernelPlatform.create_vm` creates the KVM VM; :meth:`KernelSevVm.create_vcpu` then
  creates real vCPUs (this is what the selftest does);
* :meth:`KernelPlatform.attach` wraps a VM the VMM built itself (the VMM creates its vCPUs
  through :meth:`intrahost.kvm.Vm.create_vcpu`, so :meth:`KernelSevVm.create_vcpu` only
  records their indices, and closing the wrapper leaves the VMM's VM open);
* :meth:`KernelPlatform.adopt_vm` wraps a VM fd received from another process. In this process
  it is only good as the source of a MOVE or COPY: the kernel answers every other VM ioctl
  from a process that did not create the VM with ``EIO``, and that answer is passed on as is.

What the kernel does not tell a VMM, this module tracks: which vCPUs have protected state
(after LAUNCH_UPDATE_VMSA, or after the move of an SEV-ES context) and which VMs of this
process were moved away from.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform as host_platform
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from intrahost.kvm import Cap, Kvm, KvmError, KvmUnavailableError, Vcpu, Vm, uapi
from intrahost.kvm import constants as K
from intrahost.sev.interface import (
    SEV_POLICY_ES,
    Attachment,
    FirmwareError,
    GuestState,
    GuestStatus,
    PlatformInfo,
    SevCommand,
    SevError,
    SevPlatform,
    SevVm,
    VmType,
    firmware_error_from_code,
)
from intrahost.sev.platforms import PlatformUnavailableError, register_platform

#: The SEV firmware device of the ``ccp`` driver.
DEV_SEV = "/dev/sev"

#: Where ``kvm_amd`` shows whether it enabled SEV and SEV-ES (``Y``/``N``; ``1``/``0`` on old
#: kernels).
KVM_AMD_PARAMETERS = Path("/sys/module/kvm_amd/parameters")

#: ``KVM_CAP_VM_TYPES`` (Linux 6.10+): a bitmask of the ``KVM_CREATE_VM`` types KVM accepts.
CAP_VM_TYPES = 235

#: ``KVM_GET_DEVICE_ATTR`` on ``/dev/kvm`` (Linux 6.10+): group ``KVM_X86_GRP_SEV``, attribute
#: ``KVM_X86_SEV_VMSA_FEATURES``, the VMSA features ``KVM_SEV_INIT2`` accepts;
#: ``KVM_X86_SEV_SNP_REQ_CERTS`` (Linux 6.20+, with the ``KVM_SEV_SNP_ENABLE_REQ_CERTS``
#: command) is how a kernel shows that its ``KVM_SEV_NR_MAX`` is 104, not 103.
KVM_X86_GRP_SEV = 1
KVM_X86_SEV_VMSA_FEATURES = 0
KVM_X86_SEV_SNP_REQ_CERTS = 2

#: CPUID leaf of the AMD memory encryption features: EAX bit 1 SEV, bit 3 SEV-ES; EBX[5:0]
#: the C-bit position; ECX the highest ASID; EDX the lowest SEV (not SEV-ES) ASID.
CPUID_MEMORY_ENCRYPTION = 0x8000001F
_CPUID_SEV = 1 << 1
_CPUID_SEV_ES = 1 << 3

# ------------------------------------------------------------------------------------------
# /dev/sev (<linux/psp-sev.h>)


class sev_issue_cmd(uapi.Struct):
    """The argument of ``SEV_ISSUE_CMD`` on ``/dev/sev`` (packed in the header)."""

    _pack_ = 1
    _fields_ = [("cmd", ctypes.c_uint32), ("data", ctypes.c_uint64), ("error", ctypes.c_uint32)]
    cmd: int
    data: int
    error: int


class sev_user_data_status(uapi.Struct):
    """What ``SEV_PLATFORM_STATUS`` returns (packed in the header)."""

    _pack_ = 1
    _fields_ = [
        ("api_major", ctypes.c_uint8),
        ("api_minor", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("build", ctypes.c_uint8),
        ("guest_count", ctypes.c_uint32),
    ]
    api_major: int
    api_minor: int
    state: int
    flags: int
    build: int
    guest_count: int


#: ``_IOWR('S', 0, struct sev_issue_cmd)``: direction read|write (3) in bits 30-31, the size in
#: bits 16-29, the type letter in bits 8-15, the number (0) in bits 0-7.
SEV_ISSUE_CMD = (3 << 30) | (ctypes.sizeof(sev_issue_cmd) << 16) | (ord("S") << 8)

#: ``SEV_PLATFORM_STATUS`` in ``enum sev_cmd`` of the ``/dev/sev`` interface.
SEV_PLATFORM_STATUS = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    """An ioctl outside the KVM objects (``/dev/sev``, ``/dev/kvm`` attributes); OSError."""
    if _libc_ioctl(fd, request, ctypes.addressof(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def firmware_version(sev_fd: int) -> tuple[int, int, int] | None:
    """``(api_major, api_minor, build)`` from ``SEV_PLATFORM_STATUS``, or None if refused."""
    status = sev_user_data_status()
    command = sev_issue_cmd(cmd=SEV_PLATFORM_STATUS, data=ctypes.addressof(status))
    try:
        _ioctl(sev_fd, SEV_ISSUE_CMD, command)
    except OSError:
        return None
    return status.api_major, status.api_minor, status.build


# ------------------------------------------------------------------------------------------
# CPUID

# The function ``void cpuid(u32 leaf, u32 subleaf, u32 out[4])`` in x86-64 machine code
# (System V: leaf in edi, subleaf in esi, out in rdx):
#   push rbx; mov eax, edi; mov ecx, esi; mov r8, rdx; cpuid;
#   mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")
_CpuidFunction = Callable[[int, int, int], None]


@functools.cache
def _cpuid_function() -> tuple[mmap.mmap, _CpuidFunction]:
    if host_platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(errno.ENOSYS, f"CPUID needs an x86-64 CPU, not {host_platform.machine()}")
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    prototype = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
    # The mapping is returned with the function so that it lives as long as the cache.
    return code, prototype(address)


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """``(eax, ebx, ecx, edx)`` of the CPUID instruction, executed in this process.

    Python has no CPUID, so a 27-byte function is placed in an executable anonymous mapping
    and called through ctypes. Raises OSError on other CPUs or where executable mappings are
    refused (a W^X policy).
    """
    _, function = _cpuid_function()
    out = (ctypes.c_uint32 * 4)()
    function(leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


def _memory_encryption_leaf() -> tuple[int, int, int, int] | None:
    """CPUID 0x8000001F if this CPU has it (an AMD CPU with SEV), else None."""
    try:
        if cpuid(0x80000000)[0] < CPUID_MEMORY_ENCRYPTION:
            # Above the highest extended leaf a CPU answers with another leaf's data.
            return None
        leaf = cpuid(CPUID_MEMORY_ENCRYPTION)
    except OSError:
        return None
    return leaf if leaf[0] & _CPUID_SEV else None


# ------------------------------------------------------------------------------------------
# what KVM offers


def _module_flag(name: str) -> bool:
    try:
        value = (KVM_AMD_PARAMETERS / name).read_text().strip()
    except OSError:
        return False
    return value in ("Y", "y", "1")


def _sev_attribute(kvm: Kvm, attribute: int) -> int | None:
    """A ``KVM_X86_GRP_SEV`` attribute of ``/dev/kvm``, or None where the kernel has none."""
    value = ctypes.c_uint64()
    attr = uapi.kvm_device_attr(group=KVM_X86_GRP_SEV, attr=attribute, addr=ctypes.addressof(value))
    try:
        _ioctl(kvm.fd, K.KVM_GET_DEVICE_ATTR, attr)
    except OSError:
        return None
    return value.value


def _vmsa_features(kvm: Kvm) -> int:
    # Before Linux 6.10, or without SEV: no features to offer.
    return _sev_attribute(kvm, KVM_X86_SEV_VMSA_FEATURES) or 0


def _sev_nr_max(kvm: Kvm) -> int:
    """``KVM_SEV_NR_MAX`` of this kernel: 104 where ``KVM_SEV_SNP_ENABLE_REQ_CERTS`` exists
    (its attribute answers), else 103. (Older kernels had fewer ids, but every id up to 103
    is refused alike there, so the bound only has to cover the newest command.)"""
    if _sev_attribute(kvm, KVM_X86_SEV_SNP_REQ_CERTS) is not None:
        return int(SevCommand.SNP_ENABLE_REQ_CERTS) + 1
    return int(SevCommand.SNP_ENABLE_REQ_CERTS)


def _vm_types(kvm: Kvm) -> tuple[VmType, ...]:
    mask = kvm.check_extension(CAP_VM_TYPES)
    if mask == 0:  # before Linux 6.10 there is one type
        return (VmType.DEFAULT,)
    return tuple(t for t in VmType if mask & (1 << t))


def read_platform_info(kvm: Kvm, sev_fd: int) -> PlatformInfo:
    """What this host offers: KVM's module parameters, CPUID, the firmware, KVM's caps.

    The ASID ranges and the C-bit come from CPUID 0x8000001F; where it cannot be read, the
    ranges are empty (``max_sev_asid`` 0, ``min_sev_asid`` 1). The firmware version is 0.0
    build 0 when ``SEV_PLATFORM_STATUS`` is refused.
    """
    max_asid, min_asid, cbit = 0, 1, 0
    leaf = _memory_encryption_leaf()
    if leaf is not None:
        _, ebx, ecx, edx = leaf
        max_asid, min_asid, cbit = ecx, edx, ebx & 0x3F
    major, minor, build = firmware_version(sev_fd) or (0, 0, 0)
    return PlatformInfo(
        name="kernel",
        sev_enabled=_module_flag("sev"),
        sev_es_enabled=_module_flag("sev_es"),
        max_sev_asid=max_asid,
        min_sev_asid=min_asid,
        cbit_position=cbit,
        api_major=major,
        api_minor=minor,
        build=build,
        supported_vmsa_features=_vmsa_features(kvm),
        supported_vm_types=_vm_types(kvm),
        sev_nr_max=_sev_nr_max(kvm),
    )


def kvm_sev_reason(kvm: Kvm) -> str | None:
    """None if KVM does SEV and MOVE, else why not (probed on a throwaway VM)."""
    if kvm.check_extension(Cap.VM_MOVE_ENC_CONTEXT_FROM) != 1:
        return (
            "this kernel does not offer KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM (Linux 5.16 or "
            "later is needed)"
        )
    try:
        with kvm.create_vm() as probe:
            # With a NULL argument the SEV handler answers 0; without one KVM says ENOTTY.
            probe.memory_encrypt_op(None)
    except KvmError as err:
        if err.errno == errno.ENOTTY:
            return (
                "KVM has no SEV (KVM_MEMORY_ENCRYPT_OP answers ENOTTY): it needs an AMD CPU "
                "with SEV enabled in the BIOS and kvm_amd loaded with sev=1"
            )
        return f"probing SEV in KVM failed: {err}"
    return None


def unavailable_reason(sev_path: str = DEV_SEV) -> str | None:
    """None when ``/dev/sev`` opens and KVM does SEV, else the reason (for the registry)."""
    if not os.path.exists(sev_path):
        return f"this host has no {sev_path} (no AMD SEV firmware, or the ccp driver is not loaded)"
    try:
        os.close(os.open(sev_path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return f"cannot open {sev_path}: {err.strerror} (run as root or get access to it)"
    try:
        kvm = Kvm()
    except KvmUnavailableError as err:
        return str(err)
    with kvm:
        return kvm_sev_reason(kvm)


# ------------------------------------------------------------------------------------------
# the VMs of this process, by fd number (to mark a MOVE's source dead when it is one of ours)

_VMS_LOCK = threading.Lock()
_VMS_BY_FD: weakref.WeakValueDictionary[int, KernelSevVm] = weakref.WeakValueDictionary()


def _remember(vm: KernelSevVm) -> None:
    with _VMS_LOCK:
        _VMS_BY_FD[vm.fd] = vm


def _forget(vm: KernelSevVm) -> None:
    with _VMS_LOCK:
        if _VMS_BY_FD.get(vm.fd) is vm:
            del _VMS_BY_FD[vm.fd]


def _vm_behind(fd: int) -> KernelSevVm | None:
    with _VMS_LOCK:
        vm = _VMS_BY_FD.get(fd)
    return vm if vm is not None and vm.fd == fd else None


# ------------------------------------------------------------------------------------------
# the platform and its VMs


def _command_name(command: int) -> str:
    try:
        return f"KVM_SEV_{SevCommand(command).name}"
    except ValueError:
        return f"KVM_MEMORY_ENCRYPT_OP({command})"


def _firmware_error(raw: int) -> FirmwareError | int | None:
    """``kvm_sev_cmd.error`` as a firmware status; None when the firmware said nothing (0)."""
    code = ctypes.c_int32(raw).value  # SEV_RET_NO_FW_CALL is -1 in a u32
    return None if code == 0 else firmware_error_from_code(code)


def _blob(data: bytes) -> ctypes.Array[ctypes.c_char] | None:
    """A C copy of ``data`` (None for no data: the kernel reads a zero address as "absent")."""
    return ctypes.create_string_buffer(data, len(data)) if data else None


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buffer is None else ctypes.addressof(buffer)


def _u32(operation: str, what: str, value: int) -> int:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise SevError(operation, errno.EINVAL, detail=f"{what} {value} does not fit in 32 bits")
    return value


#: The kernel gives one errno for every refusal of a MOVE or COPY; these are its causes.
_ENABLE_CAP_EINVAL = (
    "the kernel refused the pair of VMs: the destination must not be SEV yet (and, for a COPY, "
    "have no vCPUs), the source must be a live SEV or SEV-ES VM (not SEV-SNP) of the same type "
    "and not the destination; for SEV-ES both need the same number of vCPUs, all launched "
    "(LAUNCH_UPDATE_VMSA). On a host whose KVM has no SEV every MOVE and COPY is refused this "
    "way"
)


class KernelPlatform(SevPlatform):
    """SEV through this host's kernel: ``/dev/sev`` for the firmware, ``/dev/kvm`` for VMs.

    ``sev_path`` and ``kvm`` are for tests (e.g. ``/dev/null`` as the SEV device, so that the
    kernel's own answers on a host without SEV can be checked).
    """

    def __init__(self, sev_path: str = DEV_SEV, kvm: Kvm | None = None) -> None:
        try:
            self._sev_fd = os.open(sev_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise PlatformUnavailableError(
                f"cannot open {sev_path}: {err.strerror}; the kernel SEV platform needs the "
                "AMD SEV firmware device (or use --platform model)"
            ) from None
        self._owns_kvm = kvm is None
        try:
            self._kvm = Kvm() if kvm is None else kvm
        except BaseException:
            os.close(self._sev_fd)
            raise
        self._info: PlatformInfo | None = None

    @property
    def sev_fd(self) -> int:
        """This process's ``/dev/sev`` fd, passed with every SEV command."""
        return self._sev_fd

    @property
    def kvm(self) -> Kvm:
        return self._kvm

    @property
    def name(self) -> str:
        return "kernel"

    @property
    def info(self) -> PlatformInfo:
        if self._info is None:
            self._info = read_platform_info(self._kvm, self._sev_fd)
        return self._info

    def create_vm(self, vm_type: VmType = VmType.DEFAULT) -> KernelSevVm:
        try:
            vm = self._kvm.create_vm(int(vm_type))
        except KvmError as err:
            detail = f"type {vm_type.name}"
            if vm_type != VmType.DEFAULT:
                detail += (
                    f" (this kernel offers {[t.name for t in self.info.supported_vm_types]}; "
                    "the SEV types need Linux 6.10+ with SEV enabled in kvm_amd)"
                )
            raise SevError("KVM_CREATE_VM", err.errno, detail=detail) from None
        return KernelSevVm(vm, self._sev_fd, vm_type)

    def adopt_vm(self, fd: int, vm_type: VmType = VmType.DEFAULT) -> KernelSevVm:
        """Wrap (and own) a VM fd from another process; ``vm_type`` is what it was created
        with (the kernel will not say: every query from this process is answered ``EIO``)."""
        return KernelSevVm(Vm(fd, self._kvm), self._sev_fd, vm_type, adopted=True)

    def attach(self, vm: Vm, vm_type: VmType = VmType.DEFAULT) -> Attachment:
        """The SEV side of a VM the VMM created (with ``vm_type``) and keeps owning (the
        kernel does all SEV behaviour of the VM itself: ``vm`` is the VMM's object still).

        The VMM creates the vCPUs itself and reports each with ``create_vcpu(index)``, which
        here only records the index; ``close()`` leaves the VM and its vCPUs open.
        """
        return Attachment(KernelSevVm(vm, self._sev_fd, vm_type, attached=True), vm)

    def close(self) -> None:
        if self._sev_fd >= 0:
            os.close(self._sev_fd)
            self._sev_fd = -1
        if self._owns_kvm:
            self._kvm.close()


class KernelSevVm(SevVm):
    """A KVM VM seen as an SEV VM; ``fd`` is the KVM VM fd.

    ``sev_fd`` is passed with every SEV command as is (tests inject ``-1`` or ``/dev/null``).
    ``attached``: the VMM owns the VM and its vCPUs (see :meth:`KernelPlatform.attach`).
    ``adopted``: the VM was created by another process (see :meth:`KernelPlatform.adopt_vm`).
    """

    def __init__(
        self,
        vm: Vm,
        sev_fd: int,
        vm_type: VmType = VmType.DEFAULT,
        *,
        attached: bool = False,
        adopted: bool = False,
    ) -> None:
        self._vm = vm
        self._sev_fd = sev_fd
        self._vm_type = vm_type
        self._attached = attached
        self._adopted = adopted
        self._pid = os.getpid()
        self._closed = False
        #: vCPUs created here (empty for an attached VM); ``_vcpu_count`` counts recorded ones.
        self._vcpus: list[Vcpu] = []
        self._vcpu_count = 0
        self._protected: set[int] = set()
        #: Whether this VM's context is SEV-ES, once known (init, or what moved in).
        self._es: bool | None = {VmType.SEV: False, VmType.SEV_ES: True, VmType.SNP: True}.get(
            vm_type
        )
        self._moved_away = False
        _remember(self)

    def __repr__(self) -> str:
        return f"<KernelSevVm fd={self.fd} {self._vm_type.name}>"

    @property
    def fd(self) -> int:
        return -1 if self._closed else self._vm.fd

    @property
    def vm_type(self) -> VmType:
        return self._vm_type

    @property
    def vm(self) -> Vm:
        """The KVM VM."""
        return self._vm

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The vCPUs created through :meth:`create_vcpu` (none for an attached VM)."""
        return tuple(self._vcpus)

    @property
    def sev_es(self) -> bool | None:
        """Whether the context is SEV-ES; None while unknown (e.g. before init)."""
        return self._es

    # -- plumbing -------------------------------------------------------------------------------
    def _live(self, operation: str) -> Vm:
        if self._closed:
            raise SevError(operation, errno.EBADF, detail="this SEV VM was closed")
        return self._vm

    def _command(self, command: SevCommand | int, data: ctypes.Structure | None = None) -> None:
        """``KVM_MEMORY_ENCRYPT_OP``; ``data`` (and what it points to) must stay referenced by
        the caller, as it is here, until this returns."""
        name = _command_name(command)
        cmd = uapi.kvm_sev_cmd(
            id=int(command),
            data=0 if data is None else ctypes.addressof(data),
            sev_fd=self._sev_fd & 0xFFFF_FFFF,
        )
        try:
            self._live(name).memory_encrypt_op(cmd)
        except KvmError as err:
            raise SevError(name, err.errno, _firmware_error(cmd.error)) from None

    # -- vCPUs ----------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        """``KVM_CREATE_VCPU`` (id = the index unless given); on an attached VM the VMM has
        created the vCPU itself and this only records its index."""
        index = self._vcpu_count
        if not self._attached:
            vm = self._live("KVM_CREATE_VCPU")
            try:
                self._vcpus.append(vm.create_vcpu(index if vcpu_id is None else vcpu_id))
            except KvmError as err:
                raise SevError("KVM_CREATE_VCPU", err.errno) from None
        self._vcpu_count += 1
        return index

    # -- initialisation -------------------------------------------------------------------------
    def sev_init(self) -> None:
        self._command(SevCommand.INIT)
        self._es = False

    def sev_es_init(self) -> None:
        self._command(SevCommand.ES_INIT)
        self._es = True

    def sev_init2(self, vmsa_features: int = 0, ghcb_version: int = 0, flags: int = 0) -> None:
        name = "KVM_SEV_INIT2"
        params = uapi.kvm_sev_init(
            vmsa_features=vmsa_features,
            flags=_u32(name, "flags", flags),
            ghcb_version=ghcb_version,
        )
        self._command(SevCommand.INIT2, params)

    # -- launch ---------------------------------------------------------------------------------
    def launch_start(
        self, policy: int, dh_cert: bytes = b"", session: bytes = b"", handle: int = 0
    ) -> int:
        name = "KVM_SEV_LAUNCH_START"
        dh, sess = _blob(dh_cert), _blob(session)
        params = uapi.kvm_sev_launch_start(
            handle=_u32(name, "handle", handle),
            policy=_u32(name, "policy", policy),
            dh_uaddr=_address(dh),
            dh_len=_u32(name, "DH certificate length", len(dh_cert)),
            session_uaddr=_address(sess),
            session_len=_u32(name, "session length", len(session)),
        )
        self._command(SevCommand.LAUNCH_START, params)
        if self._es is None:
            self._es = bool(policy & SEV_POLICY_ES)
        return params.handle

    def launch_update_data(self, uaddr: int, length: int) -> None:
        name = "KVM_SEV_LAUNCH_UPDATE_DATA"
        params = uapi.kvm_sev_launch_update_data(uaddr=uaddr, len=_u32(name, "length", length))
        self._command(SevCommand.LAUNCH_UPDATE_DATA, params)

    def launch_update_vmsa(self, vmsas: Sequence[bytes] | None = None) -> None:
        """The kernel encrypts each vCPU's current register state (set it on the vCPUs
        first); ``vmsas`` has no meaning here and must be None."""
        if vmsas is not None:
            raise SevError(
                "KVM_SEV_LAUNCH_UPDATE_VMSA",
                errno.EINVAL,
                detail=(
                    "the kernel platform takes no VMSA blobs: the kernel encrypts the register "
                    "state each vCPU holds; set the registers on the vCPUs and pass vmsas=None"
                ),
            )
        self._command(SevCommand.LAUNCH_UPDATE_VMSA)
        self._protected = set(range(self._vcpu_count))

    def launch_measure(self) -> bytes:
        # First ask for the size (len 0): the kernel writes it back into ``len`` even when the
        # firmware reports the zero-length buffer as an error, which is then not a failure.
        query = uapi.kvm_sev_launch_measure(uaddr=0, len=0)
        try:
            self._command(SevCommand.LAUNCH_MEASURE, query)
        except SevError:
            if query.len == 0:
                raise
        if query.len == 0:
            raise SevError(
                "KVM_SEV_LAUNCH_MEASURE", errno.EPROTO, detail="the firmware reported 0 bytes"
            )
        blob = (ctypes.c_uint8 * query.len)()
        params = uapi.kvm_sev_launch_measure(uaddr=ctypes.addressof(blob), len=query.len)
        self._command(SevCommand.LAUNCH_MEASURE, params)
        return bytes(blob)[: params.len]

    def launch_secret(self, header: bytes, data: bytes, guest_uaddr: int) -> None:
        name = "KVM_SEV_LAUNCH_SECRET"
        hdr, trans = _blob(header), _blob(data)
        params = uapi.kvm_sev_launch_secret(
            hdr_uaddr=_address(hdr),
            hdr_len=_u32(name, "header length", len(header)),
            guest_uaddr=guest_uaddr,
            guest_len=_u32(name, "secret length", len(data)),
            trans_uaddr=_address(trans),
            trans_len=len(data),
        )
        self._command(SevCommand.LAUNCH_SECRET, params)

    def launch_finish(self) -> None:
        self._command(SevCommand.LAUNCH_FINISH)

    def guest_status(self) -> GuestStatus:
        params = uapi.kvm_sev_guest_status()
        self._command(SevCommand.GUEST_STATUS, params)
        try:
            state = GuestState(params.state)
        except ValueError:
            raise SevError(
                "KVM_SEV_GUEST_STATUS",
                errno.EPROTO,
                detail=f"the firmware reported guest state {params.state}, unknown to intrahost",
            ) from None
        return GuestStatus(params.handle, params.policy, state)

    def raw_command(self, command: int) -> None:
        self._command(command)

    # -- regions --------------------------------------------------------------------------------
    def register_region(self, addr: int, size: int) -> None:
        name = "KVM_MEMORY_ENCRYPT_REG_REGION"
        try:
            self._live(name).memory_encrypt_reg_region(addr, size)
        except KvmError as err:
            raise SevError(name, err.errno) from None

    def unregister_region(self, addr: int, size: int) -> None:
        name = "KVM_MEMORY_ENCRYPT_UNREG_REGION"
        try:
            self._live(name).memory_encrypt_unreg_region(addr, size)
        except KvmError as err:
            raise SevError(name, err.errno) from None

    # -- move and copy --------------------------------------------------------------------------
    def _enable_cap(self, cap: Cap, src_fd: int) -> None:
        name = f"KVM_CAP_{cap.name}"
        try:
            self._live(name).enable_cap(cap, src_fd)
        except KvmError as err:
            detail = _ENABLE_CAP_EINVAL if err.errno == errno.EINVAL else ""
            raise SevError(name, err.errno, detail=detail) from None

    def move_enc_context_from(self, src_fd: int, *, sev_es: bool | None = None) -> None:
        """MOVE the context of the VM behind ``src_fd`` here; that VM is dead afterwards.

        After the move of an SEV-ES context every vCPU of this VM has protected state. The
        kernel does not say whether the context was SEV-ES; it is known from this VM's type
        (``SEV``/``SEV_ES``), from the source when it is a VM of this process, or from
        ``sev_es`` (pass it for a default-type VM receiving a context from another process).
        """
        self._enable_cap(Cap.VM_MOVE_ENC_CONTEXT_FROM, src_fd)
        source = _vm_behind(src_fd)
        if self._vm_type != VmType.DEFAULT:
            self._es = self._vm_type in (VmType.SEV_ES, VmType.SNP)
        elif sev_es is not None:
            self._es = sev_es
        elif source is not None:
            self._es = source._es
        if self._es:
            self._protected = set(range(self._vcpu_count))
        if source is not None:
            source._moved_away = True
            source._protected.clear()

    def copy_enc_context_from(self, src_fd: int) -> None:
        """COPY: become a mirror of the VM behind ``src_fd`` (no vCPU is protected by it)."""
        self._enable_cap(Cap.VM_COPY_ENC_CONTEXT_FROM, src_fd)
        source = _vm_behind(src_fd)
        if source is not None and self._es is None:
            self._es = source._es

    # -- vCPU state -----------------------------------------------------------------------------
    def vcpu_enter(self, index: int) -> bytes | None:
        """Nothing to do: the hardware loads a protected vCPU's state (KVM_RUN answers)."""
        return None

    def vcpu_exit(self, index: int, vmsa: bytes | None = None) -> None:
        """Nothing to do: the hardware saves a protected vCPU's state."""

    def vcpu_protected(self, index: int) -> bool:
        if not 0 <= index < self._vcpu_count:
            raise SevError(
                "vcpu_protected",
                errno.EBADF,
                detail=f"{self!r} has no vCPU with index {index} ({self._vcpu_count} recorded)",
            )
        return index in self._protected

    def is_dead(self) -> bool:
        """Whether the context was moved away from this VM.

        Known for a MOVE issued in this process; otherwise asked of the kernel, which answers
        ``EIO`` to any VM ioctl on a dead VM. A VM of another process (adopted, or ours seen
        after ``fork``) gets ``EIO`` whether dead or not, so it is not asked: False unless a
        MOVE from it was seen here.
        """
        vm = self._live("is_dead")
        if self._moved_away:
            return True
        if self._adopted or os.getpid() != self._pid:
            return False
        try:
            vm.check_extension(Cap.USER_MEMORY)
        except KvmError as err:
            if err.errno != errno.EIO:
                raise SevError("is_dead", err.errno) from None
            self._moved_away = True
        return self._moved_away

    def close(self) -> None:
        """Close the VM and the vCPUs created here; an attached VM is only let go of."""
        if self._closed:
            return
        _forget(self)
        self._closed = True
        if self._attached:
            return
        for vcpu in self._vcpus:
            vcpu.close()
        self._vm.close()


register_platform("kernel", KernelPlatform, unavailable_reason)
