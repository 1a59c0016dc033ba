"""The one SEV interface that every platform implements.

A *platform* is what creates SEV VMs and runs the SEV commands on them: the Linux kernel
(``/dev/kvm`` + ``/dev/sev``, see ``intrahost.sev.kernel``) or the model platform
(``intrahost.sevmodel``), a software stand-in for KVM's SEV code and the AMD secure
processor. A VMM only talks to :class:`SevPlatform` and :class:`SevVm`; it never needs to know
which platform it has.

Names and numbers follow the kernel's uapi: :class:`VmType` is ``KVM_X86_*_VM``,
:class:`SevCommand` is ``enum sev_cmd_id``, :class:`FirmwareError` is ``sev_ret_code`` of
``<linux/psp-sev.h>``, :class:`GuestState` is the firmware's guest state. Every deliberate
failure is a :class:`SevError`: the errno the kernel would return, the operation, and the
firmware status when the firmware was reached.
"""

from __future__ import annotations

import errno as errno_mod
import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError

if TYPE_CHECKING:
    from intrahost.kvm import Vm

# ------------------------------------------------------------------------------------------
# uapi numbers


class VmType(IntEnum):
    """``KVM_CREATE_VM`` machine types (``KVM_X86_*_VM``, ``arch/x86/include/uapi/asm/kvm.h``)
    that SEV cares about. ``SW_PROTECTED`` is not an SEV type; it is here because
    ``KVM_SEV_INIT2`` must refuse it."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4

    @property
    def has_protected_state(self) -> bool:
        """``kvm->arch.has_protected_state`` (``svm_vm_init``): set for the SEV-ES and SNP
        types only. On such a VM, KVM refuses the register ioctls of a vCPU whose state is
        protected (``EINVAL``); on a default-type VM initialised with ``KVM_SEV_ES_INIT`` it
        answers them with KVM's own (meaningless) copy and ignores writes."""
        return self in (VmType.SEV_ES, VmType.SNP)


class SevCommand(IntEnum):
    """``enum sev_cmd_id``: the sub-commands of ``KVM_MEMORY_ENCRYPT_OP``."""

    INIT = 0
    ES_INIT = 1
    LAUNCH_START = 2
    LAUNCH_UPDATE_DATA = 3
    LAUNCH_UPDATE_VMSA = 4
    LAUNCH_SECRET = 5
    LAUNCH_MEASURE = 6
    LAUNCH_FINISH = 7
    SEND_START = 8
    SEND_UPDATE_DATA = 9
    SEND_UPDATE_VMSA = 10
    SEND_FINISH = 11
    RECEIVE_START = 12
    RECEIVE_UPDATE_DATA = 13
    RECEIVE_UPDATE_VMSA = 14
    RECEIVE_FINISH = 15
    GUEST_STATUS = 16
    DBG_DECRYPT = 17
    DBG_ENCRYPT = 18
    CERT_EXPORT = 19
    GET_ATTESTATION_REPORT = 20
    SEND_CANCEL = 21
    INIT2 = 22
    SNP_LAUNCH_START = 100
    SNP_LAUNCH_UPDATE = 101
    SNP_LAUNCH_FINISH = 102
    SNP_ENABLE_REQ_CERTS = 103


#: ``KVM_SEV_NR_MAX`` of current mainline (one past ``KVM_SEV_SNP_ENABLE_REQ_CERTS``, which
#: Linux 6.20 added; before it, 103). A platform says which bound it has:
#: :attr:`PlatformInfo.sev_nr_max`.
SEV_NR_MAX = 104

#: The guest policy bits of the SEV API (``LAUNCH_START.POLICY``).
SEV_POLICY_NODBG = 1 << 0
SEV_POLICY_NOKS = 1 << 1
SEV_POLICY_ES = 1 << 2
SEV_POLICY_NOSEND = 1 << 3
SEV_POLICY_DOMAIN = 1 << 4
SEV_POLICY_SEV = 1 << 5

#: ``SVM_SEV_FEAT_DEBUG_SWAP``, the one VMSA feature KVM accepts in ``KVM_SEV_INIT2``.
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
#: ``SVM_SEV_FEAT_SNP_ACTIVE``: KVM sets it in the VM's VMSA features when ``KVM_SEV_INIT2``
#: initialises an SNP VM (userspace may not pass it); it is what makes a VM an SNP guest.
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0

#: The GHCB protocol versions KVM speaks (``GHCB_VERSION_MIN`` .. ``GHCB_VERSION_MAX`` of
#: ``sev.c``); ``KVM_SEV_INIT2`` defaults an SEV-ES VM to the maximum, ``KVM_SEV_ES_INIT``
#: fixes it at the minimum.
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2

#: Bytes of the ``LAUNCH_MEASURE`` blob: 32 bytes of measurement, then the 16-byte nonce.
MEASUREMENT_LEN = 32
MNONCE_LEN = 16
LAUNCH_MEASURE_BLOB_LEN = MEASUREMENT_LEN + MNONCE_LEN


class GuestState(IntEnum):
    """The firmware's guest states (SEV API), as ``GUEST_STATUS`` reports them."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


class FirmwareError(IntEnum):
    """``sev_ret_code``: the status the secure processor returns (``kvm_sev_cmd.error``)."""

    NO_FW_CALL = -1
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWSEV_RET_PLATFORM = 0x13
    HWSEV_RET_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    EXIT_RING_BUFFER = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27


def firmware_error_from_code(code: int) -> FirmwareError | int:
    """The :class:`FirmwareError` for a raw status, or the raw number if it has no name."""
    try:
        return FirmwareError(code)
    except ValueError:
        return code


# ------------------------------------------------------------------------------------------
# the error


_HINTS: dict[int, str] = {
    errno_mod.EIO: (
        "the VM is dead (its encryption context was moved to another VM, so every later "
        "operation on it fails) or it belongs to another process: issue VM operations only "
        "from the VMM that created the VM, and only on the VM that holds the context now"
    ),
    errno_mod.EBADF: (
        "a file descriptor is closed or of the wrong kind: pass the fd of a live VM of this "
        "platform (or, for SEV commands, an open /dev/sev)"
    ),
    errno_mod.EBUSY: (
        "another move or copy involves one of these VMs, a vCPU is being created, or no "
        "ASID is free; let it finish (or free a VM) and retry"
    ),
    errno_mod.EINTR: "the requesting process went away while it waited for a lock; retry",
    errno_mod.ENOTTY: (
        "the VM is not an SEV guest (run sev_init/sev_es_init/sev_init2 first) or the "
        "platform does not support this command"
    ),
    errno_mod.EFAULT: "a required argument was missing or unreadable",
    errno_mod.ENOMEM: (
        "the memory range is not mapped writable in this process, or pinning it would "
        "exceed RLIMIT_MEMLOCK (raise it, or run with CAP_IPC_LOCK)"
    ),
    errno_mod.EDEADLK: "this thread already holds the vCPU; call vcpu_exit first",
    errno_mod.EPERM: (
        "the VM is an SEV-SNP guest: KVM accepts only the SNP commands on it "
        "(SNP_LAUNCH_START and later ids)"
    ),
}


class SevError(IntrahostError):
    """An SEV operation failed: the kernel's errno, and the firmware status if there was one.

    ``errno`` is what the kernel returns for the same situation (``EIO`` for a dead VM,
    ``EBUSY`` for a move already in progress, ...). ``firmware_error`` is set when the secure
    processor rejected the command (the kernel then returns ``EIO``); ``detail`` names the
    exact check that failed when the platform can tell (the model always can).
    """

    def __init__(
        self,
        operation: str,
        errno: int,
        firmware_error: FirmwareError | int | None = None,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.errno = errno
        self.firmware_error = firmware_error
        self.detail = detail
        super().__init__(self._message())

    @property
    def errno_name(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno))

    @property
    def firmware_error_name(self) -> str | None:
        if self.firmware_error is None:
            return None
        if isinstance(self.firmware_error, FirmwareError):
            return self.firmware_error.name
        return f"0x{self.firmware_error:x}"

    def _message(self) -> str:
        text = f"{self.operation} failed: {self.errno_name} ({os.strerror(self.errno)})"
        if self.firmware_error is not None and self.firmware_error != FirmwareError.SUCCESS:
            text += f", firmware error {self.firmware_error_name}"
        if self.detail:
            text += f": {self.detail}"
        if self.firmware_error is not None and self.firmware_error not in (
            FirmwareError.SUCCESS,
            FirmwareError.NO_FW_CALL,
        ):
            hint = (
                "the secure processor refused the command in the guest's current state; "
                "check the launch sequence (LAUNCH_START, UPDATE_DATA/VMSA, MEASURE, "
                "SECRET, FINISH)"
            )
        else:
            hint = _HINTS.get(self.errno, "")
        if hint:
            text += f" ({hint})"
        return text


# ------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class GuestStatus:
    """What ``KVM_SEV_GUEST_STATUS`` returns."""

    handle: int
    policy: int
    state: GuestState


@dataclass(frozen=True)
class PlatformInfo:
    """What a platform can do: the ASID ranges (CPUID 0x8000001F) and firmware version.

    SEV-ES ASIDs are ``1 .. min_sev_asid - 1``, SEV ASIDs ``min_sev_asid .. max_sev_asid``.
    """

    name: str
    sev_enabled: bool
    sev_es_enabled: bool
    max_sev_asid: int
    min_sev_asid: int
    cbit_position: int
    api_major: int
    api_minor: int
    build: int
    supported_vmsa_features: int
    supported_vm_types: tuple[VmType, ...]
    #: ``KVM_SEV_NR_MAX`` of this platform: one past its last command id (the bound of the
    #: selftest's sweep of commands a mirror may not issue).
    sev_nr_max: int = SEV_NR_MAX

    @property
    def sev_asids(self) -> range:
        return range(self.min_sev_asid, self.max_sev_asid + 1)

    @property
    def sev_es_asids(self) -> range:
        return range(1, self.min_sev_asid)


# ------------------------------------------------------------------------------------------
# the interface


class SevVm(Closeable):
    """One VM of a platform, identified by a file descriptor.

    ``fd`` is what travels between processes with SCM_RIGHTS and what the destination names in
    :meth:`move_enc_context_from` (on the kernel platform it is the KVM VM fd). Operations on
    the VM must come from the process that created it; from any other process they fail with
    ``EIO``, exactly like a KVM VM fd used from another process.
    """

    @property
    @abstractmethod
    def fd(self) -> int:
        """The VM's identity file descriptor (``-1`` once closed)."""

    @property
    @abstractmethod
    def vm_type(self) -> VmType:
        """The type the VM was created with."""

    @abstractmethod
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        """``KVM_CREATE_VCPU``: returns the vCPU's index (creation order), used to pair vCPUs."""

    # -- initialisation ----------------------------------------------------------------------
    @abstractmethod
    def sev_init(self) -> None:
        """``KVM_SEV_INIT`` (default-type VMs only): allocate an SEV ASID."""

    @abstractmethod
    def sev_es_init(self) -> None:
        """``KVM_SEV_ES_INIT`` (default-type VMs only): allocate an SEV-ES ASID."""

    @abstractmethod
    def sev_init2(self, vmsa_features: int = 0, ghcb_version: int = 0, flags: int = 0) -> None:
        """``KVM_SEV_INIT2`` (``VmType.SEV`` / ``SEV_ES`` / ``SNP`` VMs only).

        ``flags`` is ``struct kvm_sev_init.flags`` (KVM accepts none yet: any bit is
        ``EINVAL``). Before INIT2 a typed VM cannot run (``need_init``).
        """

    # -- launch -------------------------------------------------------------------------------
    @abstractmethod
    def launch_start(
        self, policy: int, dh_cert: bytes = b"", session: bytes = b"", handle: int = 0
    ) -> int:
        """``LAUNCH_START`` + ``ACTIVATE``: returns the firmware guest handle."""

    @abstractmethod
    def launch_update_data(self, uaddr: int, length: int) -> None:
        """``LAUNCH_UPDATE_DATA`` over ``length`` bytes of this process's memory at ``uaddr``."""

    @abstractmethod
    def launch_update_vmsa(self, vmsas: Sequence[bytes] | None = None) -> None:
        """``LAUNCH_UPDATE_VMSA`` for every vCPU (SEV-ES only).

        ``vmsas`` is each vCPU's initial register state, by index, as opaque bytes (the model
        keeps and measures it; the kernel ignores it and encrypts the state it holds).
        Afterwards the vCPUs' register state is protected.
        """

    @abstractmethod
    def launch_measure(self) -> bytes:
        """``LAUNCH_MEASURE``: the 48-byte blob, measurement (32) then nonce (16)."""

    @abstractmethod
    def launch_secret(self, header: bytes, data: bytes, guest_uaddr: int) -> None:
        """``LAUNCH_SECRET``: inject a secret packet into guest memory at ``guest_uaddr``."""

    @abstractmethod
    def launch_finish(self) -> None:
        """``LAUNCH_FINISH``: the guest becomes RUNNING."""

    @abstractmethod
    def guest_status(self) -> GuestStatus:
        """``GUEST_STATUS``."""

    @abstractmethod
    def raw_command(self, command: int) -> None:
        """``KVM_MEMORY_ENCRYPT_OP`` with ``command`` and a NULL ``data`` pointer.

        For probing which commands a VM accepts (the selftest's mirror check).
        """

    # -- regions ------------------------------------------------------------------------------
    @abstractmethod
    def register_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_REG_REGION``: pin ``size`` bytes at ``addr`` of this process."""

    @abstractmethod
    def unregister_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION`` (``addr``/``size`` must match exactly)."""

    # -- move and copy ------------------------------------------------------------------------
    @abstractmethod
    def move_enc_context_from(self, src_fd: int) -> None:
        """``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``: take the context of the VM behind ``src_fd``.

        ``src_fd`` may come from another process. On success the source VM is dead.
        """

    @abstractmethod
    def copy_enc_context_from(self, src_fd: int) -> None:
        """``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``: become a mirror of the VM behind ``src_fd``."""

    # -- vCPU state ---------------------------------------------------------------------------
    @abstractmethod
    def vcpu_enter(self, index: int) -> bytes | None:
        """Before ``KVM_RUN`` of vCPU ``index``: take its mutex; return the protected state.

        Returns the VMSA the VMM must load into the real vCPU when the vCPU's state is
        protected, ``None`` when the VMM's own register state is authoritative. Fails like
        ``KVM_RUN`` would (``EIO`` on a dead VM, ``EINVAL`` if the VM cannot run).
        """

    @abstractmethod
    def vcpu_exit(self, index: int, vmsa: bytes | None = None) -> None:
        """After ``KVM_RUN``: store the protected state (if protected) and release the mutex."""

    @abstractmethod
    def vcpu_protected(self, index: int) -> bool:
        """Whether vCPU ``index``'s register state is protected (``guest_state_protected``)."""

    @abstractmethod
    def is_dead(self) -> bool:
        """Whether the VM is dead (its context was moved away); cheap, no round trip."""

    @abstractmethod
    def close(self) -> None:
        """Close this process's identity fd (the VM goes away when every copy is closed)."""


class Attachment(NamedTuple):
    """What :meth:`SevPlatform.attach` gives the VMM: the SEV VM, and the KVM VM object the
    VMM uses from then on in place of the one it attached."""

    sev: SevVm
    kvm: Vm


class SevPlatform(Closeable):
    """A place where SEV VMs can be created: the kernel, or the model."""

    @property
    @abstractmethod
    def name(self) -> str:
        """``"kernel"`` or ``"model"``."""

    @property
    @abstractmethod
    def info(self) -> PlatformInfo:
        """Capabilities: ASID ranges, firmware version, supported VM types."""

    @abstractmethod
    def create_vm(self, vm_type: VmType = VmType.DEFAULT) -> SevVm:
        """``KVM_CREATE_VM`` with ``vm_type``."""

    @abstractmethod
    def adopt_vm(self, fd: int) -> SevVm:
        """Wrap a VM fd received from another process (takes ownership of ``fd``)."""

    @abstractmethod
    def attach(self, vm: Vm, vm_type: VmType = VmType.DEFAULT) -> Attachment:
        """The SEV VM for a KVM VM the VMM created itself (with ``vm_type``, before its
        vCPUs).

        From then on the VMM uses ``attachment.kvm`` for the KVM VM, not ``vm``: the kernel
        platform gives ``vm`` back; the model takes over its fd in an object that answers as
        the kernel's SEV VM does (see :mod:`intrahost.sevmodel.attached`). The VMM owns that
        object, creates the vCPUs on it and reports each one with :meth:`SevVm.create_vcpu`
        (by index). Once the context moved away, every KVM ioctl on it and its vCPUs fails
        with ``EIO``; once a vCPU's state is protected (SEV-ES), KVM_RUN loads and saves that
        state itself, and its register ioctls fail with ``EINVAL`` on a VM of the SEV-ES type
        (on a default-type VM they answer without the guest's state).
        """

    @abstractmethod
    def close(self) -> None:
        """Release the platform's own resources (not the VMs)."""
