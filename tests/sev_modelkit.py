"""In-process helpers for driving the KVM model directly (no service)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from intrahost.sev.interface import SEV_POLICY_ES, SevCommand, VmType
from intrahost.sevmodel.firmware import SecureProcessor
from intrahost.sevmodel.kvm_sev import IoctlFailure, KvmModel, ModelConfig, StructKvm
from intrahost.sevmodel.sync import Task

SEV_FD = 7


@dataclass
class FakeCaller:
    pid: int = 1000
    start: int = 1
    sev_fds: set[int] = field(default_factory=lambda: {SEV_FD})
    mapped: bool = True
    memlock: int | None = None

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start)

    def fd_is_sev_device(self, fd: int) -> bool:
        return fd in self.sev_fds

    def range_mapped_writable(self, addr: int, size: int) -> bool:
        return self.mapped

    def memlock_limit_pages(self) -> int | None:
        return self.memlock


def make_model(**config: Any) -> tuple[KvmModel, list[StructKvm]]:
    cfg = ModelConfig(**config)
    fw = SecureProcessor(b"k" * 32, cfg.max_sev_asid, cfg.min_sev_asid, cfg.firmware)
    dead: list[StructKvm] = []
    return KvmModel(cfg, fw, on_dead=dead.append), dead


ME = FakeCaller()


def task(name: str = "t", cgroup: str = "/") -> Task:
    return Task(name, cgroup=cgroup)


def kerr(call: Callable[[], object]) -> IoctlFailure:
    with pytest.raises(IoctlFailure) as info:
        call()
    return info.value


def op(
    kvm: KvmModel,
    vm: StructKvm,
    cmd: SevCommand | int,
    data: dict[str, Any] | None = None,
    caller: FakeCaller = ME,
    t: Task | None = None,
) -> dict[str, Any]:
    return kvm.sev_mem_enc_ioctl(t or task(), caller, vm, int(cmd), data, SEV_FD)


def vm_with_vcpus(
    kvm: KvmModel, n: int, vm_type: VmType = VmType.DEFAULT, caller: FakeCaller = ME
) -> StructKvm:
    vm = kvm.create_vm(caller, vm_type)
    for i in range(n):
        kvm.create_vcpu(task(), caller, vm, i)
    return vm


def sev_vm(
    kvm: KvmModel,
    es: bool = False,
    vcpus: int = 4,
    launch: bool = True,
    caller: FakeCaller = ME,
    t: Task | None = None,
) -> StructKvm:
    vm = kvm.create_vm(caller, VmType.DEFAULT)
    op(kvm, vm, SevCommand.ES_INIT if es else SevCommand.INIT, caller=caller, t=t)
    for i in range(vcpus):
        kvm.create_vcpu(task(), caller, vm, i)
    if launch:
        op(kvm, vm, SevCommand.LAUNCH_START, {"policy": SEV_POLICY_ES if es else 0}, caller)
        if es:
            op(
                kvm,
                vm,
                SevCommand.LAUNCH_UPDATE_VMSA,
                {"vmsas": [b"v%d" % i for i in range(vcpus)]},
                caller,
            )
    return vm


def move(
    kvm: KvmModel,
    dst: StructKvm,
    src: StructKvm | None,
    caller: FakeCaller = ME,
    t: Task | None = None,
) -> None:
    kvm.sev_vm_move_enc_context_from(t or task(), caller, dst, src)


def copy(kvm: KvmModel, dst: StructKvm, src: StructKvm | None, caller: FakeCaller = ME) -> None:
    kvm.sev_vm_copy_enc_context_from(task(), caller, dst, src)
