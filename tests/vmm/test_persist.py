"""The state interface: JSON records read tolerantly and type-checked, parts looked up by
component, a machine's components in restore order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from support import needs_kvm

from intrahost.vmm.config import MachineConfig, MachineConfigError, config_flags
from intrahost.vmm.persist import (
    JsonRecord,
    Parts,
    StateFormatError,
    bounded,
    prepare_records,
)


@dataclass(frozen=True)
class Sample(JsonRecord, label="sample", version=3):
    count: int = bounded(0xFF)
    name: str = "x"
    blob: bytes = b""
    flag: bool = False
    offset: int | None = None


def test_a_record_round_trips_and_ignores_what_it_does_not_know() -> None:
    record = Sample(7, "seven", b"\x01\x02", True, -5)
    data = record.to_dict()
    assert data == {"version": 3, "count": 7, "name": "seven", "blob": "0102", "flag": True,
                    "offset": -5}  # fmt: skip
    assert Sample.from_dict(data | {"added_later": [1]}) == record
    assert Sample.from_dict({"version": 3, "count": 1}) == Sample(1)  # defaults fill in


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": 1}, r"sample: missing keys \['version'\]"),
        ({"version": 4, "count": 1}, "sample version 4 is not supported"),
        ({"version": 3}, r"sample: missing keys \['count'\]"),
        ({"version": 3, "count": True}, "count must be an integer"),
        ({"version": 3, "count": 256}, r"count must be an integer in 0\.\.0xff"),
        ({"version": 3, "count": 1, "name": 5}, "name must be a string"),
        ({"version": 3, "count": 1, "blob": "xyz"}, "blob is not valid hex"),
        ({"version": 3, "count": 1, "flag": 0}, "flag must be a bool"),
        ({"version": 3, "count": 1, "offset": "1"}, "offset must be an integer or null"),
    ],
)
def test_a_malformed_record_names_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(StateFormatError, match=message):
        Sample.from_dict(data)


def test_parts_name_the_component_in_errors() -> None:
    source = {"thing/meta": b'{"version": 3}', "thing/raw": b"12"}
    parts = Parts(source, "thing")
    with pytest.raises(StateFormatError, match=r"component 'thing/meta': missing keys"):
        parts.record(Sample, "meta")
    with pytest.raises(StateFormatError, match="lacks the required component 'thing/other'"):
        parts.need("other")
    assert parts.get("raw") == b"12" and Parts(source, "thing/raw").need() == b"12"
    prepare_records()


def test_machine_config_is_written_once() -> None:
    """Its JSON form and its command-line flags both come from the fields."""
    config = MachineConfig(memory=32 << 20, vcpus=2, sev="sev-es", sev_policy=5)
    assert MachineConfig.from_dict(config.to_dict() | {"newer": 1}) == config
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(MachineConfig)}
    with pytest.raises(MachineConfigError, match="vcpus must be an integer"):
        MachineConfig.from_dict({"vcpus": "two"})
    flags = dict(config_flags())
    assert set(flags) == set(config.to_dict())
    assert [f.name for f in flags["sev"]] == ["--sev", "--sev-es"]
    assert flags["memory"][0].parse is not None and flags["memory"][0].parse("1G") == 1 << 30


@needs_kvm
def test_a_machine_lists_its_components_in_restore_order() -> None:
    from intrahost.vmm.machine import Machine, MachineError
    from intrahost.vmm.memory import GuestMemory

    config = MachineConfig(memory=16 << 20, vcpus=2, serial="none")
    machine = Machine(config, GuestMemory.create(config.memory))
    try:
        assert list(machine.components()) == [
            "vm", "vcpu/0", "vcpu/1", "device/uart", "device/debug"
        ]  # fmt: skip
        with pytest.raises(MachineError, match="device/uart"):
            machine.add_state("device/uart", machine.uart.persist())
    finally:
        machine.close()
