"""The kernel platform (``intrahost.sev.kernel``) on whatever this host's kernel can answer.

This host has no SEV (no ``/dev/sev``, and its KVM has no SEV handler), so nothing here can be
launched or moved for real. What is checked:

* the platform registry: the kernel platform names why it is unavailable, ``auto`` picks the
  model, ``kernel`` refuses with the reason;
* real ioctls through the platform's own code paths, with ``/dev/null`` standing in for
  ``/dev/sev``: the kernel's answers for a VM without SEV (ENOTTY for SEV commands and regions,
  EINVAL for MOVE and COPY whatever the source fd), and EIO for a VM fd used from a process
  that did not create it;
* the ABI without hardware: a stand-in VM object records each ``kvm_sev_cmd`` at the moment
  of the ioctl and reads the command structs and the buffers they point to, so every address
  and length is checked while it is live; the ``/dev/sev`` structs against the C header;
* the platform's own bookkeeping (protected vCPUs, dead sources).

The selftest suite (``test_sev_selftest.py``) runs on the kernel platform where SEV exists
and is skipped here with the reason; one of its cases runs here against this kernel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sev_testlib import ServiceHandle, expect

from intrahost.kvm import Cap, Kvm, KvmError, KvmUnavailableError, Vm, uapi
from intrahost.sev import (
    SEV_POLICY_ES,
    FirmwareError,
    GuestState,
    PlatformUnavailableError,
    SevCommand,
    SevVm,
    VmType,
    open_platform,
    unavailable_reason,
)
from intrahost.sev import kernel as kp
from intrahost.sev import selftest as st
from intrahost.sevmodel.attached import AttachedVm
from intrahost.sevmodel.client import ModelPlatform

REPO = Path(__file__).resolve().parents[2]


def _kvm_or_none() -> Kvm | None:
    try:
        return Kvm()
    except KvmUnavailableError:
        return None


def _kvm_without_sev() -> str | None:
    """Why the no-SEV answers cannot be checked here (None: they can)."""
    kvm = _kvm_or_none()
    if kvm is None:
        return "no usable /dev/kvm"
    with kvm:
        if kp.kvm_sev_reason(kvm) is None:
            return "this host's KVM has SEV: its answers are the real ones, see the selftests"
    return None


_NO_SEV_SKIP = _kvm_without_sev()
needs_kvm_without_sev = pytest.mark.skipif(_NO_SEV_SKIP is not None, reason=_NO_SEV_SKIP or "")


@pytest.fixture
def kernel() -> Iterator[kp.KernelPlatform]:
    """The kernel platform with /dev/null as its SEV device (real /dev/kvm)."""
    if _kvm_or_none() is None:
        pytest.skip("no usable /dev/kvm")
    platform = kp.KernelPlatform(sev_path="/dev/null")
    yield platform
    platform.close()


# ------------------------------------------------------------------------------------------
# availability and the registry


@pytest.mark.skipif(os.path.exists(kp.DEV_SEV), reason="this host has /dev/sev")
def test_unavailable_reason_names_the_missing_device() -> None:
    reason = kp.unavailable_reason()
    assert reason is not None and "/dev/sev" in reason
    assert unavailable_reason("kernel") is not None


@needs_kvm_without_sev
def test_unavailable_reason_probes_kvm_past_the_device() -> None:
    # /dev/null opens like /dev/sev would, so the probe reaches KVM: a throwaway VM answers
    # KVM_MEMORY_ENCRYPT_OP(NULL) with ENOTTY because KVM has no SEV here.
    reason = kp.unavailable_reason(sev_path="/dev/null")
    assert reason is not None and "ENOTTY" in reason and "kvm_amd" in reason


def test_unavailable_reason_for_a_device_that_does_not_open(tmp_path: Path) -> None:
    # A directory exists but cannot be opened read-write (EISDIR), even by root.
    reason = kp.unavailable_reason(sev_path=str(tmp_path))
    assert reason is not None and "cannot open" in reason


@pytest.mark.skipif(unavailable_reason("kernel") is None, reason="the kernel platform is usable")
def test_open_platform_kernel_refuses_with_the_reason() -> None:
    with pytest.raises(PlatformUnavailableError) as info:
        open_platform("kernel")
    assert str(unavailable_reason("kernel")) in str(info.value)
    assert "--platform model" in str(info.value)


@pytest.mark.skipif(unavailable_reason("kernel") is None, reason="the kernel platform is usable")
def test_open_platform_auto_picks_the_model(
    model_service: ServiceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTRAHOST_SEV_MODEL_SOCKET", model_service.path)
    platform = open_platform("auto")
    try:
        assert isinstance(platform, ModelPlatform) and platform.name == "model"
    finally:
        platform.close()


def test_kernel_platform_without_the_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlatformUnavailableError, match="cannot open"):
        kp.KernelPlatform(sev_path=str(tmp_path / "no-such-sev"))


# ------------------------------------------------------------------------------------------
# what this host's kernel answers


@needs_kvm_without_sev
def test_info_reports_this_host(kernel: kp.KernelPlatform) -> None:
    info = kernel.info
    assert info.name == "kernel" and kernel.name == "kernel"
    assert not info.sev_enabled and not info.sev_es_enabled  # kvm_amd has no sev=1 here
    assert VmType.DEFAULT in info.supported_vm_types
    mask = kernel.kvm.check_extension(kp.CAP_VM_TYPES)
    if mask:
        assert info.supported_vm_types == tuple(t for t in VmType if mask & (1 << t))
    # /dev/null refuses SEV_PLATFORM_STATUS, and no SEV VMSA features are offered.
    assert (info.api_major, info.api_minor, info.build) == (0, 0, 0)
    assert info.supported_vmsa_features == 0
    if kp._memory_encryption_leaf() is None:  # CPUID shows no SEV: the ranges are empty
        assert not info.sev_asids and not info.sev_es_asids


@pytest.mark.skipif(host_platform.machine() != "x86_64", reason="CPUID is x86")
def test_cpuid_runs_in_process() -> None:
    eax, ebx, ecx, edx = kp.cpuid(0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"vendor_id\t: {vendor}" in cpuinfo
    assert eax >= 1


@needs_kvm_without_sev
@pytest.mark.parametrize(
    "operation",
    [
        "sev_init",
        "sev_es_init",
        "sev_init2",
        "launch_start",
        "launch_update_data",
        "launch_update_vmsa",
        "launch_measure",
        "launch_secret",
        "launch_finish",
        "guest_status",
        "raw_command",
        "register_region",
        "unregister_region",
    ],
)
def test_sev_commands_on_a_vm_without_sev_are_enotty(
    kernel: kp.KernelPlatform, operation: str
) -> None:
    buffer = ctypes.create_string_buffer(4096)
    address = ctypes.addressof(buffer)
    calls: dict[str, Callable[[SevVm], object]] = {
        "sev_init": lambda vm: vm.sev_init(),
        "sev_es_init": lambda vm: vm.sev_es_init(),
        "sev_init2": lambda vm: vm.sev_init2(),
        "launch_start": lambda vm: vm.launch_start(0, b"dh", b"session"),
        "launch_update_data": lambda vm: vm.launch_update_data(address, 4096),
        "launch_update_vmsa": lambda vm: vm.launch_update_vmsa(),
        "launch_measure": lambda vm: vm.launch_measure(),
        "launch_secret": lambda vm: vm.launch_secret(b"h" * 52, b"s" * 16, address),
        "launch_finish": lambda vm: vm.launch_finish(),
        "guest_status": lambda vm: vm.guest_status(),
        "raw_command": lambda vm: vm.raw_command(SevCommand.GUEST_STATUS),
        "register_region": lambda vm: vm.register_region(address, 4096),
        "unregister_region": lambda vm: vm.unregister_region(address, 4096),
    }
    with kernel.create_vm() as vm:
        err = expect(lambda: calls[operation](vm), errno.ENOTTY)
    # Refused by KVM before any firmware call: no firmware status.
    assert err.firmware_error is None


@needs_kvm_without_sev
@pytest.mark.parametrize("capability", ["move", "copy"])
def test_move_and_copy_on_a_kvm_without_sev_are_einval(
    kernel: kp.KernelPlatform, capability: str
) -> None:
    # This KVM has no MOVE/COPY handler (no SEV), and x86 KVM_ENABLE_CAP then answers EINVAL
    # before it looks at args[0]: a non-SEV source, a closed fd, a non-VM fd, a negative fd
    # and the VM itself all get EINVAL here. (On an SEV host the three bad fds get EBADF.)
    with (
        kernel.create_vm() as dst,
        kernel.create_vm() as plain,
        open("/dev/null", "rb") as not_a_vm,
    ):
        for _ in range(4):
            plain.create_vcpu()
        closed = os.dup(not_a_vm.fileno())
        os.close(closed)
        call: Callable[[int], None] = (
            dst.move_enc_context_from if capability == "move" else dst.copy_enc_context_from
        )
        for src_fd in (plain.fd, closed, not_a_vm.fileno(), -1, dst.fd):
            err = expect(functools.partial(call, src_fd), errno.EINVAL)
            assert err.operation.endswith(f"{capability.upper()}_ENC_CONTEXT_FROM")
            assert "SEV" in err.detail
        assert not dst.is_dead() and not plain.is_dead()


@needs_kvm_without_sev
def test_selftest_parameters_case_runs_on_this_kernel(kernel: kp.KernelPlatform) -> None:
    """The selftest's first parameter case (MOVE from a non-SEV VM: EINVAL) needs no SEV."""
    st.test_sev_migrate_parameters(kernel, have_sev_es=False)


@pytest.mark.parametrize("vm_type", [VmType.SEV, VmType.SEV_ES, VmType.SNP])
def test_sev_vm_types_need_a_kernel_that_has_them(
    kernel: kp.KernelPlatform, vm_type: VmType
) -> None:
    """x86.c ``kvm_arch_init_vm``: a type outside ``kvm_caps.supported_vm_types`` (which
    sev.c ``sev_set_cpu_caps`` fills only where SEV, SEV-ES, SNP are enabled) is EINVAL."""
    if vm_type in kernel.info.supported_vm_types:
        pytest.skip(f"this kernel creates {vm_type.name} VMs")
    err = expect(lambda: kernel.create_vm(vm_type), errno.EINVAL)
    assert "6.10" in err.detail and vm_type.name in err.detail


@needs_kvm_without_sev
def test_the_command_bound_of_this_kernel(kernel: kp.KernelPlatform) -> None:
    """KVM_SEV_NR_MAX: 104 where the KVM_X86_SEV_SNP_REQ_CERTS attribute of /dev/kvm answers
    (sev.c ``sev_dev_get_attr``, with KVM_SEV_SNP_ENABLE_REQ_CERTS), else 103."""
    has_attribute = kp._sev_attribute(kernel.kvm, kp.KVM_X86_SEV_SNP_REQ_CERTS) is not None
    assert kernel.info.sev_nr_max == (104 if has_attribute else 103)
    assert not has_attribute  # a kernel without SEV has no SEV attributes


def test_vcpus_and_state_of_a_created_vm(kernel: kp.KernelPlatform) -> None:
    with kernel.create_vm() as vm:
        assert [vm.create_vcpu() for _ in range(3)] == [0, 1, 2]
        assert vm.create_vcpu(7) == 3
        assert [v.vcpu_id for v in vm.vcpus] == [0, 1, 2, 7]
        expect(lambda: vm.create_vcpu(7), errno.EEXIST)  # the kernel's answer, passed on
        assert not vm.vcpu_protected(3)
        expect(lambda: vm.vcpu_protected(4), errno.EBADF)
        assert vm.vcpu_enter(0) is None
        vm.vcpu_exit(0)
        assert not vm.is_dead()
        vcpus = vm.vcpus
    assert vm.fd == -1 and all(v.closed for v in vcpus)
    expect(vm.guest_status, errno.EBADF)
    expect(vm.is_dead, errno.EBADF)
    expect(lambda: vm.move_enc_context_from(0), errno.EBADF)


def test_attach_leaves_the_vmm_in_charge(kernel: kp.KernelPlatform) -> None:
    with kernel.kvm.create_vm() as vm:
        sev, kvm_vm = kernel.attach(vm)
        assert sev.fd == vm.fd and kvm_vm is vm  # the kernel does SEV on the VMM's VM itself
        vcpu = vm.create_vcpu(0)  # the VMM's own vCPU ...
        assert sev.create_vcpu(0) == 0  # ... only recorded (a second KVM_CREATE_VCPU: EEXIST)
        assert sev.vcpus == ()
        sev.close()
        assert sev.fd == -1 and not vm.closed and not vcpu.closed
        assert vm.check_extension(Cap.USER_MEMORY) == 1
        vcpu.close()


def test_launch_update_vmsa_takes_no_blobs(kernel: kp.KernelPlatform) -> None:
    with kernel.create_vm() as vm:
        err = expect(lambda: vm.launch_update_vmsa([b"regs"]), errno.EINVAL)
    assert "vmsas=None" in str(err)


_CHILD = """
import json, sys
from intrahost.kvm import Cap, KvmError
from intrahost.sev import SevError
from intrahost.sev.kernel import KernelPlatform

def errno_of(call):
    try:
        call()
    except (SevError, KvmError) as err:
        return err.errno
    return 0

platform = KernelPlatform(sev_path="/dev/null")
vm = platform.adopt_vm(int(sys.argv[1]))
own = platform.create_vm()
print(json.dumps({
    "guest_status": errno_of(vm.guest_status),
    "launch_start": errno_of(lambda: vm.launch_start(0)),
    "sev_init": errno_of(vm.sev_init),
    "create_vcpu": errno_of(vm.create_vcpu),
    "register_region": errno_of(lambda: vm.register_region(0x1000, 0x1000)),
    "move_into": errno_of(lambda: vm.move_enc_context_from(own.fd)),
    "check_extension": errno_of(lambda: vm.vm.check_extension(Cap.USER_MEMORY)),
    "is_dead": vm.is_dead(),
    "own_check_extension": errno_of(lambda: own.vm.check_extension(Cap.USER_MEMORY)),
}))
"""


def test_a_vm_fd_from_another_process_answers_eio(kernel: kp.KernelPlatform) -> None:
    """KVM answers EIO to every VM ioctl from a process whose mm is not the VM's.

    The fd reaches the child as an inherited descriptor (SCM_RIGHTS gives the same file).
    """
    with kernel.create_vm() as vm:
        vm.create_vcpu()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(vm.fd)],
            pass_fds=[vm.fd],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        seen = json.loads(out)
        assert not vm.is_dead()  # still alive and ours
    eio = errno.EIO
    assert seen == {
        "guest_status": eio,
        "launch_start": eio,
        "sev_init": eio,
        "create_vcpu": eio,
        "register_region": eio,
        "move_into": eio,
        "check_extension": eio,
        # The kernel gives no way to tell dead from foreign, so an adopted VM is not probed.
        "is_dead": False,
        "own_check_extension": 0,
    }


# ------------------------------------------------------------------------------------------
# the ABI, without hardware: a stand-in VM sees each ioctl's argument while it is live


Answer = Callable[[uapi.kvm_sev_cmd], None]


class RecordingVm(Vm):
    """A Vm whose SEV ioctls are answered by the test (on a /dev/null fd)."""

    def __init__(self) -> None:
        super().__init__(os.open("/dev/null", os.O_RDWR))
        self.commands: list[uapi.kvm_sev_cmd] = []
        self.answers: list[Answer] = []
        self.caps: list[tuple[int, tuple[int, ...]]] = []
        self.dead = False

    def memory_encrypt_op(self, cmd: uapi.kvm_sev_cmd | None) -> int:
        assert cmd is not None
        self.commands.append(uapi.kvm_sev_cmd.from_buffer_copy(bytes(cmd)))
        if self.answers:
            self.answers.pop(0)(cmd)
        return 0

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> int:
        self.caps.append((int(cap), args))
        return 0

    def check_extension(self, cap: Cap | int) -> int:
        if self.dead:
            raise KvmError(errno.EIO, "KVM_CHECK_EXTENSION", repr(self))
        return 1


@pytest.fixture
def recording() -> Iterator[Callable[..., tuple[kp.KernelSevVm, RecordingVm]]]:
    made: list[tuple[kp.KernelSevVm, RecordingVm]] = []

    def make(
        sev_fd: int = 42, vm_type: VmType = VmType.DEFAULT, attached: bool = True
    ) -> tuple[kp.KernelSevVm, RecordingVm]:
        vm = RecordingVm()
        sev = kp.KernelSevVm(vm, sev_fd, vm_type, attached=attached)
        made.append((sev, vm))
        return sev, vm

    yield make
    for sev, vm in made:
        sev.close()
        vm.close()


def _struct_at(kind: type[uapi.Struct], cmd: uapi.kvm_sev_cmd) -> Any:
    assert cmd.data != 0, "the command struct's address is missing"
    return kind.from_address(cmd.data)


def test_kvm_sev_cmd_carries_id_sev_fd_and_no_data(recording: Callable[..., Any]) -> None:
    sev, vm = recording(sev_fd=42)
    sev.sev_init()
    sev.launch_finish()
    sev.raw_command(19)
    assert [(c.id, c.data, c.sev_fd, c.error) for c in vm.commands] == [
        (0, 0, 42, 0),
        (7, 0, 42, 0),
        (19, 0, 42, 0),
    ]
    injected, vm2 = recording(sev_fd=-1)
    injected.launch_update_vmsa()
    assert vm2.commands[0].id == 4 and vm2.commands[0].sev_fd == 0xFFFF_FFFF


def test_launch_start_passes_policy_handle_and_blobs(recording: Callable[..., Any]) -> None:
    sev, vm = recording()
    seen: dict[str, object] = {}

    def answer(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_start, cmd)
        seen.update(
            policy=p.policy,
            handle=p.handle,
            dh=ctypes.string_at(p.dh_uaddr, p.dh_len),
            session=ctypes.string_at(p.session_uaddr, p.session_len),
        )
        p.handle = 0x1234  # the kernel writes the new handle back

    vm.answers.append(answer)
    assert sev.launch_start(0x5, b"dh-cert-bytes", b"session-blob", handle=9) == 0x1234
    assert seen == {"policy": 5, "handle": 9, "dh": b"dh-cert-bytes", "session": b"session-blob"}
    assert vm.commands[0].id == SevCommand.LAUNCH_START

    def empty(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_start, cmd)
        seen.update(addresses=(p.dh_uaddr, p.dh_len, p.session_uaddr, p.session_len))

    vm.answers.append(empty)
    sev.launch_start(0)
    assert seen["addresses"] == (0, 0, 0, 0)  # no blobs: NULL addresses, as the kernel expects


def test_launch_update_data_and_secret(recording: Callable[..., Any]) -> None:
    sev, vm = recording()
    seen: dict[str, object] = {}

    def update(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_update_data, cmd)
        seen["update"] = (p.uaddr, p.len)

    def secret(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_secret, cmd)
        seen["secret"] = (
            ctypes.string_at(p.hdr_uaddr, p.hdr_len),
            p.guest_uaddr,
            p.guest_len,
            ctypes.string_at(p.trans_uaddr, p.trans_len),
        )

    vm.answers += [update, secret]
    sev.launch_update_data(0x7F00_0000_1000, 0x20_0000)
    sev.launch_secret(b"H" * 52, b"secret!!" * 2, 0x7F00_0000_2000)
    assert seen == {
        "update": (0x7F00_0000_1000, 0x20_0000),
        "secret": (b"H" * 52, 0x7F00_0000_2000, 16, b"secret!!" * 2),
    }
    assert [c.id for c in vm.commands] == [3, 5]
    err = expect(lambda: sev.launch_update_data(0x1000, 1 << 32), errno.EINVAL)
    assert "32 bits" in err.detail and len(vm.commands) == 2  # refused before the ioctl


def test_launch_measure_asks_for_the_size_first(recording: Callable[..., Any]) -> None:
    sev, vm = recording()
    blob = bytes(range(48))
    calls: list[tuple[int, int]] = []

    def query(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_measure, cmd)
        calls.append((p.uaddr, p.len))
        # What the kernel does for len 0: the size comes back, with the firmware's complaint.
        p.len = len(blob)
        cmd.error = FirmwareError.INVALID_LEN
        raise KvmError(errno.EIO, "KVM_MEMORY_ENCRYPT_OP", "Vm")

    def fetch(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_launch_measure, cmd)
        calls.append((p.uaddr, p.len))
        ctypes.memmove(p.uaddr, blob, p.len)

    vm.answers += [query, fetch]
    assert sev.launch_measure() == blob
    assert calls[0] == (0, 0) and calls[1][0] != 0 and calls[1][1] == 48


def test_guest_status_and_init2(recording: Callable[..., Any]) -> None:
    sev, vm = recording(vm_type=VmType.SEV_ES)
    seen: dict[str, object] = {}

    def init2(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_init, cmd)
        seen["init2"] = (p.vmsa_features, p.flags, p.ghcb_version)

    def status(cmd: uapi.kvm_sev_cmd) -> None:
        p = _struct_at(uapi.kvm_sev_guest_status, cmd)
        p.handle, p.policy, p.state = 3, 0x4, GuestState.LUPDATE

    vm.answers += [init2, status]
    sev.sev_init2(vmsa_features=1 << 5, ghcb_version=2, flags=1 << 31)
    got = sev.guest_status()
    assert seen["init2"] == (1 << 5, 1 << 31, 2)  # flags reach the kernel as given
    assert (got.handle, got.policy, got.state) == (3, 4, GuestState.LUPDATE)
    assert [c.id for c in vm.commands] == [22, 16]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0x02, FirmwareError.INVALID_GUEST_STATE),
        (0xFFFF_FFFF, FirmwareError.NO_FW_CALL),
        (0x7E, 0x7E),
    ],
)
def test_firmware_status_reaches_the_error(
    recording: Callable[..., Any], raw: int, expected: FirmwareError | int
) -> None:
    sev, vm = recording()

    def refuse(cmd: uapi.kvm_sev_cmd) -> None:
        cmd.error = raw
        raise KvmError(errno.EIO, "KVM_MEMORY_ENCRYPT_OP", "Vm")

    vm.answers.append(refuse)
    err = expect(sev.launch_finish, errno.EIO)
    assert err.firmware_error == expected and err.operation == "KVM_SEV_LAUNCH_FINISH"


def test_move_and_copy_name_the_source_in_args0(recording: Callable[..., Any]) -> None:
    src, _ = recording()
    dst, dst_vm = recording()
    mirror, mirror_vm = recording()
    dst.move_enc_context_from(src.fd)
    mirror.copy_enc_context_from(dst.fd)
    assert dst_vm.caps == [(Cap.VM_MOVE_ENC_CONTEXT_FROM, (src.fd,))]
    assert mirror_vm.caps == [(Cap.VM_COPY_ENC_CONTEXT_FROM, (dst.fd,))]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_dev_sev_structs_match_the_header(tmp_path: Path) -> None:
    header = Path("/usr/include/linux/psp-sev.h")
    if not header.exists():
        pytest.skip("no <linux/psp-sev.h>")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>"]
    lines.append("#include <linux/psp-sev.h>")
    lines.append("int main(void){")
    for struct in (kp.sev_issue_cmd, kp.sev_user_data_status):
        name = struct.__name__
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in struct._fields_:
            lines.append(
                f'printf("offset {name}.{field} %zu\\n", offsetof(struct {name}, {field}));'
            )
    lines.append('printf("const SEV_ISSUE_CMD %lu\\n", (unsigned long)SEV_ISSUE_CMD);')
    lines.append('printf("const SEV_PLATFORM_STATUS %d\\n", (int)SEV_PLATFORM_STATUS);')
    lines.append("return 0;}")
    source = tmp_path / "psp.c"
    source.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "psp"), str(source)], check=True)
    out = subprocess.run([str(tmp_path / "psp")], check=True, capture_output=True, text=True)
    c_view = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.stdout.splitlines())}
    for struct in (kp.sev_issue_cmd, kp.sev_user_data_status):
        name = struct.__name__
        assert ctypes.sizeof(struct) == c_view[f"sizeof {name}"]
        for field, *_ in struct._fields_:
            assert getattr(struct, field).offset == c_view[f"offset {name}.{field}"], field
    assert c_view["const SEV_ISSUE_CMD"] == kp.SEV_ISSUE_CMD
    assert c_view["const SEV_PLATFORM_STATUS"] == kp.SEV_PLATFORM_STATUS


def test_firmware_version_is_none_when_refused() -> None:
    with open("/dev/null", "rb") as device:
        assert kp.firmware_version(device.fileno()) is None


# ------------------------------------------------------------------------------------------
# bookkeeping: protected vCPUs and dead sources


def test_launch_update_vmsa_protects_the_vcpus_so_far(recording: Callable[..., Any]) -> None:
    sev, _ = recording()
    sev.sev_es_init()
    sev.create_vcpu(0)
    sev.create_vcpu(1)
    assert not sev.vcpu_protected(0)
    sev.launch_update_vmsa()
    late = sev.create_vcpu(2)
    assert sev.vcpu_protected(0) and sev.vcpu_protected(1) and not sev.vcpu_protected(late)


@pytest.mark.parametrize("es", [False, True])
def test_a_move_within_this_process(recording: Callable[..., Any], es: bool) -> None:
    src, _ = recording()
    if es:
        src.sev_es_init()
    else:
        src.sev_init()
    src.create_vcpu(0)
    src.launch_start(SEV_POLICY_ES if es else 0)
    if es:
        src.launch_update_vmsa()
    dst, _ = recording()
    dst.create_vcpu(0)
    dst.move_enc_context_from(src.fd)
    assert src.is_dead() and not dst.is_dead()
    assert dst.vcpu_protected(0) is es and not src.vcpu_protected(0)
    assert dst.sev_es is es


def test_a_move_from_another_process_needs_the_hint_or_the_type(
    recording: Callable[..., Any],
) -> None:
    unknown_fd = 1000  # a source the platform never saw (as if received over a socket)
    plain, _ = recording()
    plain.create_vcpu(0)
    plain.move_enc_context_from(unknown_fd)
    assert plain.sev_es is None and not plain.vcpu_protected(0)
    hinted, _ = recording()
    hinted.create_vcpu(0)
    hinted.move_enc_context_from(unknown_fd, sev_es=True)
    assert hinted.vcpu_protected(0)
    typed, _ = recording(vm_type=VmType.SEV_ES)
    typed.create_vcpu(0)
    typed.move_enc_context_from(unknown_fd, sev_es=False)  # the type wins
    assert typed.vcpu_protected(0)


def test_is_dead_reads_eio_from_the_kernel(recording: Callable[..., Any]) -> None:
    sev, vm = recording()
    assert not sev.is_dead()
    vm.dead = True  # as after another VM moved the context away
    assert sev.is_dead()
    vm.dead = False
    assert sev.is_dead()  # dead is final


# ------------------------------------------------------------------------------------------
# attach on the model: the real KVM VM follows the model VM's death


def test_model_attach_guards_the_kvm_vm(model: ModelPlatform) -> None:
    kvm = _kvm_or_none()
    if kvm is None:
        pytest.skip("no usable /dev/kvm")
    with kvm:
        plain = kvm.create_vm()
        sev, vm = model.attach(plain)
        assert isinstance(vm, AttachedVm) and plain.closed  # the model's object took the fd
        sev.sev_init()  # before any vCPU, as the kernel requires
        vcpu = vm.create_vcpu(0)
        assert sev.create_vcpu(0) == 0
        sev.launch_start(0)
        vm.check_extension(Cap.USER_MEMORY)
        vcpu.get_regs()
        with model.create_vm() as dst:
            dst.move_enc_context_from(sev.fd)
            for call in (lambda: vm.check_extension(Cap.USER_MEMORY), vcpu.get_regs):
                with pytest.raises(KvmError) as info:
                    call()
                assert info.value.errno == errno.EIO and "moved" in str(info.value)
            sev.close()
            with pytest.raises(KvmError):  # still dead once the model VM is closed
                vm.check_extension(Cap.USER_MEMORY)
        vcpu.close()
        vm.close()


def test_model_attach_protects_sev_es_vcpus_launched_or_moved_in(model: ModelPlatform) -> None:
    """On VMs of the SEV-ES type (x86.c refuses the register ioctls of a protected vCPU where
    ``kvm->arch.has_protected_state``, which ``svm_vm_init`` sets for that type)."""
    kvm = _kvm_or_none()
    if kvm is None:
        pytest.skip("no usable /dev/kvm")
    with kvm:
        src, src_vm = model.attach(kvm.create_vm(), VmType.SEV_ES)
        dst, dst_vm = model.attach(kvm.create_vm(), VmType.SEV_ES)
        try:
            src.sev_init2()
            src_vcpu = src_vm.create_vcpu(0)
            src.create_vcpu(0)
            dst_vcpu = dst_vm.create_vcpu(0)
            dst.create_vcpu(0)
            src.launch_start(SEV_POLICY_ES)
            src_vcpu.get_regs()
            src.launch_update_vmsa()  # the VMSA is the attached vCPU's register state
            expect_kvm(src_vcpu.get_regs, errno.EINVAL)
            dst_vcpu.get_regs()
            dst.move_enc_context_from(src.fd)
            expect_kvm(dst_vcpu.get_regs, errno.EINVAL)  # the service said: protected
            expect_kvm(src_vcpu.get_regs, errno.EIO)  # dead first
        finally:
            for obj in (src_vcpu, dst_vcpu, src_vm, dst_vm, src, dst):
                obj.close()


def test_model_attach_of_a_legacy_es_vm_leaves_register_ioctls_lax(model: ModelPlatform) -> None:
    """On default-type VMs initialised with KVM_SEV_ES_INIT (no ``has_protected_state``,
    x86.c) the register ioctls of protected vCPUs succeed, launched or moved in; they carry
    no guest state."""
    kvm = _kvm_or_none()
    if kvm is None:
        pytest.skip("no usable /dev/kvm")
    with kvm:
        src, src_vm = model.attach(kvm.create_vm())
        dst, dst_vm = model.attach(kvm.create_vm())
        try:
            src.sev_es_init()
            src_vcpu = src_vm.create_vcpu(0)
            src.create_vcpu(0)
            dst_vcpu = dst_vm.create_vcpu(0)
            dst.create_vcpu(0)
            src.launch_start(SEV_POLICY_ES)
            src.launch_update_vmsa()
            assert src.vcpu_protected(0)
            assert src_vcpu.get_regs().rip == 0 and bytes(src_vcpu.get_fpu()) == bytes(
                uapi.kvm_fpu()
            )
            dst.move_enc_context_from(src.fd)
            assert dst.vcpu_protected(0)
            assert bytes(dst_vcpu.get_sregs()) == bytes(uapi.kvm_sregs())
            dst_vcpu.set_regs(uapi.kvm_regs())
            expect_kvm(src_vcpu.get_regs, errno.EIO)  # the source is dead all the same
        finally:
            for obj in (src_vcpu, dst_vcpu, src_vm, dst_vm, src, dst):
                obj.close()


def expect_kvm(call: Callable[[], object], err: int) -> None:
    with pytest.raises(KvmError) as info:
        call()
    assert info.value.errno == err, info.value
