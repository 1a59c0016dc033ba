"""One class per KVM kernel object: :class:`Kvm` (/dev/kvm), :class:`Vm` and :class:`Vcpu`.

Each owns its file descriptor, closes it on ``close()`` or at the end of a ``with`` block, and
offers typed methods for the ioctls that are legal on it. Every failed ioctl raises
:class:`KvmError` with the errno, the ioctl's name and the object.

Every ioctl goes through one method, ``_ioctl``. A layer that needs a VM to answer as another
kernel would (the SEV model makes a plain VM answer as an SEV VM) subclasses :class:`Vm` and
:class:`Vcpu` and overrides that method; the classes here carry no such behaviour.

Arguments: a ctypes struct or array goes to ``fcntl.ioctl`` as a writable buffer (the kernel
reads and writes it; one of at most 1 KiB is copied through a scratch area on the C stack and
back, a larger one is passed in place), as does an integer that fits a C ``int`` (KVM_RUN's 0,
a vCPU id). Only a larger integer (an address, KVM_SET_TSS_ADDR's) goes through libc's
``ioctl`` with ctypes, which takes an ``unsigned long``. Both release the GIL for the call, so
vCPU threads run in parallel; ``fcntl.ioctl`` costs about half of the ctypes call (measured
here: 2.3 against 4.7 µs of CPU for KVM_GET_REGS), which counts in a hand-off's pause.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from intrahost.closing import Closeable
from intrahost.errors import IntrahostError
from intrahost.kvm import constants as K
from intrahost.kvm import uapi
from intrahost.kvm.constants import Cap
from intrahost.kvm.exits import INTERRUPTED, VcpuExit, decode

#: The KVM device; INTRAHOST_KVM_DEVICE overrides it (tests use it to simulate a host
#: without KVM).
DEV_KVM = os.environ.get("INTRAHOST_KVM_DEVICE", "/dev/kvm")

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int
_INT_MAX = 0x7FFF_FFFF
_MSRS_HEADER = struct.Struct("<II")  # struct kvm_msrs: nmsrs, pad
_CPUID_HEADER = struct.Struct("<II")  # struct kvm_cpuid2: nent, padding


class KvmError(IntrahostError):
    """An ioctl on a KVM object failed."""

    def __init__(self, err: int, ioctl: str, obj: str, detail: str = "") -> None:
        self.errno = err
        self.ioctl = ioctl
        self.obj = obj
        name = errno.errorcode.get(err, str(err))
        text = f"{ioctl} on {obj} failed: {os.strerror(err)} ({name})"
        super().__init__(f"{text}: {detail}" if detail else text)


class KvmUnavailableError(IntrahostError):
    """/dev/kvm cannot be opened or speaks an unexpected API version."""


class _FdObject(Closeable):
    """An owned file descriptor with checked ioctls (closed by ``with``)."""

    _kind = "fd"

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __repr__(self) -> str:
        return f"{self._kind}(fd={self._fd})"

    def _check(self, name: str) -> None:
        """Raise before an ioctl that must not be issued (closed fd, dead VM, ...)."""
        if self._fd < 0:
            raise KvmError(errno.EBADF, name, repr(self))

    def _ioctl(self, request: int, name: str, arg: Any = 0) -> int:
        """The one ioctl path (see the module docstring for how ``arg`` is passed)."""
        self._check(name)
        if isinstance(arg, int) and not 0 <= arg <= _INT_MAX:
            ret = _libc_ioctl(self._fd, request, arg)
            if ret < 0:
                raise KvmError(ctypes.get_errno(), name, repr(self))
            return int(ret)
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(self._fd, request, arg)
            result: int = fcntl.ioctl(self._fd, request, arg, True)
        except OSError as e:
            raise KvmError(e.errno or errno.EIO, name, repr(self)) from None
        return result

    def detach(self) -> int:
        """Give up the fd without closing it and return it (its new owner closes it); this
        object is closed afterwards."""
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class Kvm(_FdObject):
    """The /dev/kvm system fd."""

    _kind = "Kvm"

    def __init__(self, path: str | None = None) -> None:
        path = path or DEV_KVM
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (enable virtualization and load "
                "the kvm module)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: run as root or add your user to the 'kvm' group"
            ) from None
        super().__init__(fd)
        version = self.get_api_version()
        if version != K.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; intrahost needs {K.KVM_API_VERSION}"
            )

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        """Wrap an already open /dev/kvm fd (used by tests, e.g. with a closed fd)."""
        obj = cls.__new__(cls)
        _FdObject.__init__(obj, fd)
        return obj

    def get_api_version(self) -> int:
        return self._ioctl(K.KVM_GET_API_VERSION, "KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        return self._ioctl(K.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", int(cap))

    def get_vcpu_mmap_size(self) -> int:
        return self._ioctl(K.KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self, vm_type: int = K.KVM_X86_DEFAULT_VM) -> Vm:
        fd = self._ioctl(K.KVM_CREATE_VM, "KVM_CREATE_VM", vm_type)
        return Vm(fd, self)

    def get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        n = K.MAX_CPUID_ENTRIES
        buf = uapi.flex(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, n)()
        buf.hdr.nent = n
        self._ioctl(K.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", buf)
        return [uapi.kvm_cpuid_entry2.from_bytes(bytes(e)) for e in buf.entries[: buf.hdr.nent]]

    def get_msr_index_list(self) -> list[int]:
        n = K.MAX_MSR_ENTRIES
        buf = uapi.flex(uapi.kvm_msr_list, ctypes.c_uint32, n)()
        buf.hdr.nmsrs = n
        self._ioctl(K.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST", buf)
        return list(buf.entries[: buf.hdr.nmsrs])


class Vm(_FdObject):
    """A KVM VM fd."""

    _kind = "Vm"

    def __init__(self, fd: int, kvm: Kvm | None = None) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: Cap | int) -> int:
        return self._ioctl(K.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", int(cap))

    def create_vcpu(self, vcpu_id: int, mmap_size: int | None = None) -> Vcpu:
        fd = self._ioctl(K.KVM_CREATE_VCPU, "KVM_CREATE_VCPU", vcpu_id)
        if mmap_size is None:
            mmap_size = self.kvm.get_vcpu_mmap_size() if self.kvm is not None else 3 * 4096
        try:
            return self._vcpu_object(fd, vcpu_id, mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def _vcpu_object(self, fd: int, vcpu_id: int, mmap_size: int) -> Vcpu:
        """The object for a new vCPU fd of this VM. A subclass whose ioctls behave otherwise
        gives its vCPUs a matching :class:`Vcpu` subclass here."""
        return Vcpu(fd, self, vcpu_id, mmap_size)

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl(K.KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl(K.KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", ctypes.c_uint64(addr))

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = uapi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        self._ioctl(K.KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", region)

    def create_irqchip(self) -> None:
        self._ioctl(K.KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = K.KVM_PIT_SPEAKER_DUMMY) -> None:
        self._ioctl(K.KVM_CREATE_PIT2, "KVM_CREATE_PIT2", uapi.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        arg = uapi.kvm_irq_level(level=level)
        arg.irq = irq
        self._ioctl(K.KVM_IRQ_LINE, "KVM_IRQ_LINE", arg)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes (1, 2, 4, 8; 0 for any) at MMIO
        address (or, with ``pio``, port) ``addr`` signals eventfd ``fd`` in the kernel instead
        of exiting to userspace; with ``datamatch`` only a write of that value does.
        ``deassign`` removes a registration made with the same arguments."""
        flags = K.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= K.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = uapi.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags
        )
        self._ioctl(K.KVM_IOEVENTFD, "KVM_IOEVENTFD", arg)

    def irqfd(
        self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False
    ) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi`` on the in-kernel irqchip (an
        edge; with ``resample_fd``, a level held until the guest's EOI, which then signals
        ``resample_fd`` so the device can re-assert it). ``deassign`` detaches ``fd``."""
        flags = K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= K.KVM_IRQFD_FLAG_RESAMPLE
        arg = uapi.kvm_irqfd(
            fd=fd, gsi=gsi, flags=flags, resamplefd=0 if resample_fd is None else resample_fd
        )
        self._ioctl(K.KVM_IRQFD, "KVM_IRQFD", arg)

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        self._ioctl(K.KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        self._ioctl(K.KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> uapi.kvm_pit_state2:
        state = uapi.kvm_pit_state2()
        self._ioctl(K.KVM_GET_PIT2, "KVM_GET_PIT2", state)
        return state

    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        self._ioctl(K.KVM_SET_PIT2, "KVM_SET_PIT2", state)

    def get_clock(self) -> uapi.kvm_clock_data:
        data = uapi.kvm_clock_data()
        self._ioctl(K.KVM_GET_CLOCK, "KVM_GET_CLOCK", data)
        return data

    def set_clock(self, data: uapi.kvm_clock_data) -> None:
        self._ioctl(K.KVM_SET_CLOCK, "KVM_SET_CLOCK", data)

    def get_tsc_khz(self) -> int:
        return self._ioctl(K.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> int:
        arg = uapi.kvm_enable_cap(cap=int(cap), flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        return self._ioctl(K.KVM_ENABLE_CAP, "KVM_ENABLE_CAP", arg)

    def memory_encrypt_op(self, cmd: uapi.kvm_sev_cmd | None) -> int:
        """KVM_MEMORY_ENCRYPT_OP; ``cmd.error`` holds the firmware status afterwards."""
        if cmd is None:
            return self._ioctl(K.KVM_MEMORY_ENCRYPT_OP, "KVM_MEMORY_ENCRYPT_OP", 0)
        return self._ioctl(K.KVM_MEMORY_ENCRYPT_OP, "KVM_MEMORY_ENCRYPT_OP", ctypes.addressof(cmd))

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        region = uapi.kvm_enc_region(addr=addr, size=size)
        self._ioctl(K.KVM_MEMORY_ENCRYPT_REG_REGION, "KVM_MEMORY_ENCRYPT_REG_REGION", region)

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        region = uapi.kvm_enc_region(addr=addr, size=size)
        self._ioctl(K.KVM_MEMORY_ENCRYPT_UNREG_REGION, "KVM_MEMORY_ENCRYPT_UNREG_REGION", region)


class Vcpu(_FdObject):
    """A KVM vCPU fd with its mapped ``kvm_run`` page."""

    _kind = "Vcpu"

    def __init__(self, fd: int, vm: Vm | None, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._map: mmap.mmap | None = None
        self._run: uapi.kvm_run | None = None
        if mmap_size:
            self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._run = uapi.kvm_run.from_buffer(self._map)

    def __repr__(self) -> str:
        return f"Vcpu(id={self.vcpu_id}, fd={self._fd})"

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """The mapped ``kvm_run``, for the fields userspace sets (``immediate_exit``); what
        an exit reports comes decoded from :meth:`run`."""
        if self._run is None:
            raise KvmError(errno.EBADF, "mmap(kvm_run)", repr(self))
        return self._run

    def close(self) -> None:
        self._run = None
        if self._map is not None:
            self._map.close()
            self._map = None
        super().close()

    # --- running ---------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """KVM_RUN once; returns the decoded exit (see :mod:`intrahost.kvm.exits`).

        :class:`Interrupted` means there is no exit to handle: a signal or ``immediate_exit``
        interrupted the call (EINTR), or a vCPU waiting for INIT/SIPI received an event and
        asks to be entered again (EAGAIN). A :class:`PortIn` or :class:`MmioRead` must be
        completed before the next ``run()``.
        """
        if type(self)._ioctl is not Vcpu._ioctl:  # a platform that wraps KVM_RUN
            try:
                self._ioctl(K.KVM_RUN, "KVM_RUN")
            except KvmError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    return INTERRUPTED
                raise
        else:
            self._check("KVM_RUN")
            try:
                fcntl.ioctl(self._fd, K.KVM_RUN, 0)
            except OSError as e:
                # No KvmError for the common case, a pause's kick: building one costs more
                # than the interrupted KVM_RUN itself, on the way to parking.
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    return INTERRUPTED
                raise KvmError(e.errno or errno.EIO, "KVM_RUN", repr(self)) from None
        if self._map is None:
            raise KvmError(errno.EBADF, "mmap(kvm_run)", repr(self))
        return decode(self._map)

    # --- register state ----------------------------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        self._ioctl(K.KVM_GET_REGS, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self._ioctl(K.KVM_SET_REGS, "KVM_SET_REGS", regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        self._ioctl(K.KVM_GET_SREGS, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self._ioctl(K.KVM_SET_SREGS, "KVM_SET_SREGS", sregs)

    def get_sregs2(self) -> uapi.kvm_sregs2:
        sregs = uapi.kvm_sregs2()
        self._ioctl(K.KVM_GET_SREGS2, "KVM_GET_SREGS2", sregs)
        return sregs

    def set_sregs2(self, sregs: uapi.kvm_sregs2) -> None:
        self._ioctl(K.KVM_SET_SREGS2, "KVM_SET_SREGS2", sregs)

    def get_fpu(self) -> uapi.kvm_fpu:
        fpu = uapi.kvm_fpu()
        self._ioctl(K.KVM_GET_FPU, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        self._ioctl(K.KVM_SET_FPU, "KVM_SET_FPU", fpu)

    def get_xsave(self, size: int = ctypes.sizeof(uapi.kvm_xsave)) -> bytes:
        """The XSAVE area: KVM_GET_XSAVE2 when ``size`` exceeds 4 KiB (its size comes from
        ``check_extension(Cap.XSAVE2)``), else KVM_GET_XSAVE."""
        buf = (ctypes.c_uint8 * max(size, ctypes.sizeof(uapi.kvm_xsave)))()
        if size > ctypes.sizeof(uapi.kvm_xsave):
            self._ioctl(K.KVM_GET_XSAVE2, "KVM_GET_XSAVE2", buf)
        else:
            self._ioctl(K.KVM_GET_XSAVE, "KVM_GET_XSAVE", buf)
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * max(len(data), ctypes.sizeof(uapi.kvm_xsave))).from_buffer_copy(
            data.ljust(ctypes.sizeof(uapi.kvm_xsave), b"\0")
        )
        self._ioctl(K.KVM_SET_XSAVE, "KVM_SET_XSAVE", buf)

    def get_xcrs(self) -> uapi.kvm_xcrs:
        xcrs = uapi.kvm_xcrs()
        self._ioctl(K.KVM_GET_XCRS, "KVM_GET_XCRS", xcrs)
        return xcrs

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        self._ioctl(K.KVM_SET_XCRS, "KVM_SET_XCRS", xcrs)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        dbg = uapi.kvm_debugregs()
        self._ioctl(K.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", dbg)
        return dbg

    def set_debugregs(self, dbg: uapi.kvm_debugregs) -> None:
        self._ioctl(K.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", dbg)

    def get_lapic(self) -> uapi.kvm_lapic_state:
        lapic = uapi.kvm_lapic_state()
        self._ioctl(K.KVM_GET_LAPIC, "KVM_GET_LAPIC", lapic)
        return lapic

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        self._ioctl(K.KVM_SET_LAPIC, "KVM_SET_LAPIC", lapic)

    def get_mp_state(self) -> int:
        state = uapi.kvm_mp_state()
        self._ioctl(K.KVM_GET_MP_STATE, "KVM_GET_MP_STATE", state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self._ioctl(K.KVM_SET_MP_STATE, "KVM_SET_MP_STATE", uapi.kvm_mp_state(mp_state))

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        events = uapi.kvm_vcpu_events()
        self._ioctl(K.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", events)
        return events

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        self._ioctl(K.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Read MSRs; the result holds the ones KVM read (it stops at the first failure)."""
        buf = uapi.flex(uapi.kvm_msrs, uapi.kvm_msr_entry, len(indices))()
        buf.hdr.nmsrs = len(indices)
        for entry, index in zip(buf.entries, indices, strict=True):
            entry.index = index
        n = self._ioctl(K.KVM_GET_MSRS, "KVM_GET_MSRS", buf)
        return {e.index: e.data for e in buf.entries[:n]}

    def read_msrs(self, buf: ctypes.Structure) -> MsrEntries:
        """KVM_GET_MSRS into ``buf`` (from :func:`msr_buffer`); the entries KVM read (it
        stops at the first failure), raw."""
        n = self._ioctl(K.KVM_GET_MSRS, "KVM_GET_MSRS", buf)
        header = ctypes.sizeof(uapi.kvm_msrs)
        return MsrEntries(bytes(buf)[header : header + n * MsrEntries.ENTRY.size])

    def set_msrs(self, msrs: Iterable[tuple[int, int]] | MsrEntries) -> int:
        """Write MSRs; returns how many KVM wrote (it stops at the first failure)."""
        if isinstance(msrs, MsrEntries):
            raw = bytearray(_MSRS_HEADER.pack(len(msrs), 0))
            raw += msrs.raw
            return self._ioctl(K.KVM_SET_MSRS, "KVM_SET_MSRS", raw)
        items = list(msrs)
        buf = uapi.flex(uapi.kvm_msrs, uapi.kvm_msr_entry, len(items))()
        buf.hdr.nmsrs = len(items)
        for entry, (index, value) in zip(buf.entries, items, strict=True):
            entry.index, entry.data = index, value
        return self._ioctl(K.KVM_SET_MSRS, "KVM_SET_MSRS", buf)

    def set_cpuid2(self, entries: Sequence[uapi.kvm_cpuid_entry2]) -> None:
        buf = uapi.flex(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, len(entries))()
        buf.hdr.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        self._ioctl(K.KVM_SET_CPUID2, "KVM_SET_CPUID2", buf)

    def set_cpuid_table(self, table: bytes) -> None:
        """KVM_SET_CPUID2 with ``table``, raw kvm_cpuid_entry2 entries (one buffer, no
        Python object per entry)."""
        size = ctypes.sizeof(uapi.kvm_cpuid_entry2)
        if len(table) % size:
            raise ValueError(f"{len(table)} bytes are not a kvm_cpuid_entry2 array")
        raw = bytearray(_CPUID_HEADER.pack(len(table) // size, 0))
        raw += table
        self._ioctl(K.KVM_SET_CPUID2, "KVM_SET_CPUID2", raw)

    def get_cpuid2(self) -> list[uapi.kvm_cpuid_entry2]:
        n = K.MAX_CPUID_ENTRIES
        buf = uapi.flex(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, n)()
        buf.hdr.nent = n
        self._ioctl(K.KVM_GET_CPUID2, "KVM_GET_CPUID2", buf)
        return [uapi.kvm_cpuid_entry2.from_bytes(bytes(e)) for e in buf.entries[: buf.hdr.nent]]

    def get_tsc_khz(self) -> int:
        return self._ioctl(K.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        self._ioctl(K.KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", khz)

    def kvmclock_ctrl(self) -> None:
        self._ioctl(K.KVM_KVMCLOCK_CTRL, "KVM_KVMCLOCK_CTRL")

    def has_device_attr(self, group: int, attr: int) -> bool:
        try:
            arg = uapi.kvm_device_attr(group=group, attr=attr)
            self._ioctl(K.KVM_HAS_DEVICE_ATTR, "KVM_HAS_DEVICE_ATTR", arg)
        except KvmError as e:
            if e.errno in (errno.ENXIO, errno.ENOTTY, errno.EINVAL):
                return False
            raise
        return True

    def get_device_attr_u64(self, group: int, attr: int) -> int:
        value = ctypes.c_uint64()
        arg = uapi.kvm_device_attr(group=group, attr=attr, addr=ctypes.addressof(value))
        self._ioctl(K.KVM_GET_DEVICE_ATTR, "KVM_GET_DEVICE_ATTR", arg)
        return value.value

    def set_device_attr_u64(self, group: int, attr: int, value: int) -> None:
        data = ctypes.c_uint64(value)
        arg = uapi.kvm_device_attr(group=group, attr=attr, addr=ctypes.addressof(data))
        self._ioctl(K.KVM_SET_DEVICE_ATTR, "KVM_SET_DEVICE_ATTR", arg)

    def get_tsc_offset(self) -> int:
        """The vCPU's TSC offset (guest TSC = host TSC + offset), KVM_VCPU_TSC_OFFSET."""
        return self.get_device_attr_u64(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET)

    def set_tsc_offset(self, offset: int) -> None:
        self.set_device_attr_u64(
            K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, offset & 0xFFFF_FFFF_FFFF_FFFF
        )


class MsrEntries:
    """A ``kvm_msr_entry`` array as raw bytes (index u32, reserved u32, data u64 each), as
    KVM_GET_MSRS fills it and KVM_SET_MSRS reads it: passed through without a Python object
    per MSR. Iterates as ``(index, data)`` pairs."""

    __slots__ = ("raw",)
    ENTRY = struct.Struct("<IIQ")

    def __init__(self, raw: bytes) -> None:
        if len(raw) % self.ENTRY.size:
            raise ValueError(f"{len(raw)} bytes are not a kvm_msr_entry array")
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw) // self.ENTRY.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, data) for index, _reserved, data in self.ENTRY.iter_unpack(self.raw))

    def __getitem__(self, i: int) -> tuple[int, int]:
        index, _reserved, data = self.ENTRY.unpack_from(self.raw, i * self.ENTRY.size)
        return index, data


def msr_buffer(indices: Sequence[int]) -> ctypes.Structure:
    """A ``kvm_msrs`` for :meth:`Vcpu.read_msrs`, sized and indexed once, reused for every
    read (KVM_GET_MSRS writes only the data fields)."""
    buf: ctypes.Structure = uapi.flex(uapi.kvm_msrs, uapi.kvm_msr_entry, len(indices))()
    buf.hdr.nmsrs = len(indices)
    for entry, index in zip(buf.entries, indices, strict=True):
        entry.index = index
    return buf
