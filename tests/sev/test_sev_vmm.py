"""The VMM's SEV decisions: which initialisation, which guests may be handed off, and what it
tells the user. Each test names the kernel source the decision follows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm

from intrahost.migration.sender import MigrationFailed, Sender
from intrahost.sev import PlatformInfo, VmType
from intrahost.vmm.confidential import choose_initialisation
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB

BEFORE_6_10 = PlatformInfo(
    name="kernel",
    sev_enabled=True,
    sev_es_enabled=True,
    max_sev_asid=509,
    min_sev_asid=100,
    cbit_position=51,
    api_major=1,
    api_minor=55,
    build=0,
    supported_vmsa_features=0,
    supported_vm_types=(VmType.DEFAULT,),
    sev_nr_max=22,
)


def test_the_legacy_initialisation_where_there_are_no_sev_vm_types() -> None:
    init = choose_initialisation(BEFORE_6_10)
    assert init.vm_type == VmType.DEFAULT
    assert "no SEV VM type" in init.reason


def test_the_legacy_initialisation_also_where_there_are() -> None:
    """sev.c ``sev_migrate_from`` leaves ``need_init`` behind and svm.c ``svm_vcpu_pre_run``
    refuses KVM_RUN while it is set: a guest of an SEV VM type could be moved but its
    destination never run, so the VMM initialises with KVM_SEV_INIT / KVM_SEV_ES_INIT on a
    default-type VM even where KVM_CAP_VM_TYPES offers the SEV types."""
    later = replace(
        BEFORE_6_10,
        supported_vm_types=(VmType.DEFAULT, VmType.SEV, VmType.SEV_ES, VmType.SNP),
        sev_nr_max=104,
    )
    init = choose_initialisation(later)
    assert init.vm_type == VmType.DEFAULT
    assert "SEV, SEV_ES, SNP" in init.reason and "need_init" in init.reason


@pytest.fixture
def sev_machine() -> Any:
    machine = Machine.create(
        MachineConfig(
            memory=32 * MiB,
            guest="counter",
            serial="none",
            sev="sev-es",
            sev_platform="model",
        )
    )
    yield machine
    machine.close()


@needs_kvm
@pytest.mark.parametrize("vm_type", [VmType.SNP, VmType.SEV_ES])
def test_guests_a_move_cannot_take_are_refused_before_the_pause(
    sev_machine: Machine, vm_type: VmType, tmp_path: Path
) -> None:
    """An SNP guest: sev.c ``sev_vm_move_enc_context_from`` refuses SNP sources ("KVM: SEV: Do
    not allow intra-host migration/mirroring of SNP VMs"). A guest of an SEV VM type: its
    destination could not run (see above). The sender says so before it connects, let alone
    pauses, and the guest keeps running."""
    confidential = sev_machine.confidential
    assert confidential is not None
    assert confidential.handoff_refusal() is None  # the VMM's own choice can be handed off
    typed = confidential.platform.create_vm(vm_type)
    try:
        legacy, confidential.vm = confidential.vm, typed
        try:
            sev_machine.start()
            with pytest.raises(MigrationFailed) as info:
                Sender(sev_machine, f"unix:{tmp_path / 'nobody.sock'}").run()
        finally:
            confidential.vm = legacy
    finally:
        typed.close()
    message = str(info.value)
    if vm_type == VmType.SNP:
        assert "SEV-SNP guest cannot be handed off" in message and "EINVAL" in message
    else:
        assert "KVM_SEV_INIT2" in message and "need_init" in message
    assert "stays here" in message
    assert sev_machine.status == "running"


@needs_kvm
def test_the_model_notice_is_given_once(vmm_factory: Any, sockdir: Path) -> None:
    """A VMM on the model platform says once that guest memory is not encrypted."""
    api = sockdir / "api.sock"
    vmm = vmm_factory(
        "run",
        "--memory",
        "32M",
        "--sev",
        "--platform",
        "model",
        "--serial",
        "none",
        "--api-socket",
        str(api),
        wait_path=api,
    )
    output = vmm.output().lower()
    assert output.count("not encrypt") == 1, output
