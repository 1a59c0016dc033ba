"""Protocol version negotiation at START: the source offers the range it speaks, the
destination picks the newest version both speak (or refuses naming both), and the state is
written for that version. A future version is faked by raising ``PROTOCOL_VERSION`` on one
side only (the other side is a separate VMM process, or the test itself)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm, wait_for_path
from test_protocol import Session

import intrahost
from intrahost.migration import envelope, protocol, state
from intrahost.migration.protocol import (
    Command,
    NoCommonVersion,
    PeerRefused,
    VersionRange,
)
from intrahost.migration.receiver import ReceiveState
from intrahost.migration.sender import MigrationFailed, Sender
from intrahost.service.qmp_client import QmpClient
from intrahost.vmm.guests import layout
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import MiB


def start_with(s: Session, body: dict[str, Any]) -> dict[str, Any]:
    return s.source.request(Command.START, protocol.to_json(body), [s.baton.fd])


@pytest.fixture
def session() -> Iterator[Session]:
    s = Session()
    yield s
    s.finish()
    s.baton.close()


def test_the_source_offers_its_range_and_a_version_an_older_peer_accepts() -> None:
    body = protocol.start_offer()
    assert body["versions"] == [protocol.OLDEST_PROTOCOL_VERSION, protocol.PROTOCOL_VERSION]
    # v0.1.0 reads only "version" and accepts its own (1): the oldest this VMM speaks.
    assert body["version"] == protocol.OLDEST_PROTOCOL_VERSION


def test_a_start_without_a_range_is_exactly_its_version(session: Session) -> None:
    """What v0.1.0 sends: {"version": 1, "copy_memory": ...}."""
    reply = start_with(session, {"version": 1, "copy_memory": False})
    assert reply["version"] == 1
    assert session.receiver.protocol_version == 1


def test_a_future_destination_picks_the_newest_common_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 2)
    for body, chosen in (
        ({"version": 1}, 1),  # v0.1.0
        ({"version": 1, "versions": [1, 1]}, 1),  # this tree
        ({"version": 1, "versions": [1, 3]}, 2),  # a newer one
    ):
        s = Session()
        try:
            assert start_with(s, body)["version"] == chosen
            assert s.receiver.protocol_version == chosen
        finally:
            s.finish()
            s.baton.close()


def test_no_common_version_is_refused_naming_both(session: Session) -> None:
    with pytest.raises(PeerRefused) as refused:
        start_with(session, {"version": 2, "versions": [2, 3]})
    text = str(refused.value)
    assert "protocol versions 2 to 3 are not accepted" in text
    assert f"this VMM (intrahost {intrahost.__version__}) speaks protocol version 1" in text
    session.thread.join(5)
    assert session.receiver.state is ReceiveState.FAILED


@pytest.mark.parametrize(
    ("versions", "why"),
    [
        ([3, 1], "is not a range"),
        ("1-2", "is not a range"),
        ([1, True], "is not a range"),
        ([0, 1], "is not a range"),
        ([2, 3], "outside"),  # "version" 1 is not in it
    ],
)
def test_a_malformed_offer_is_refused(versions: object, why: str) -> None:
    s = Session()
    try:
        with pytest.raises(PeerRefused, match=why):
            start_with(s, {"version": 1, "versions": versions})
    finally:
        s.finish()
        s.baton.close()


def test_the_source_takes_the_chosen_version_or_stops_before_the_pause() -> None:
    offered = VersionRange(1, 2)
    assert protocol.agreed({"version": 1}, offered) == 1
    assert protocol.agreed({"version": 2}, offered) == 2
    assert protocol.agreed({}, offered) == 1  # no answer: the version START named
    for reply in ({"version": 7}, {"version": "1"}, {"version": 0}):
        with pytest.raises(NoCommonVersion, match="this VMM") as failed:
            protocol.agreed(reply, offered)
        assert "protocol versions 1 to 2" in str(failed.value)


# --- the state written for an older peer ---------------------------------------------------------


class _Future:
    """A state component that a future version adds (required for its own peers)."""

    def save_parts(self) -> list[tuple[str, bytes]]:
        return [("", b"{}")]

    def load_parts(self, parts: object) -> Any:
        return lambda: None


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine.create(MachineConfig(memory=16 * MiB, guest="counter", serial="none"))
    yield m
    m.close()


@needs_kvm
def test_components_newer_than_the_peer_are_written_optional(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine._device_state["future"] = _Future()  # type: ignore[assignment]
    monkeypatch.setattr(state, "ADDED_IN", {"future": 2})
    monkeypatch.setattr(state, "STATE_MINOR", {1: 2, 2: 7})
    machine.start()
    machine.pause()
    for_v2 = envelope.decode(state.save_machine(machine, protocol_version=2))
    assert for_v2.components["future"].required and for_v2.minor == 7
    for_v1 = envelope.decode(state.save_machine(machine, protocol_version=1))
    assert not for_v1.components["future"].required and for_v1.minor == 2
    assert for_v1.components["config"].required
    # A reader of version 1 ignores it now, and refused it before.
    state.decode_state(state.save_machine(machine, protocol_version=1))
    with pytest.raises(state.StateFormatError, match="does not understand"):
        state.decode_state(state.save_machine(machine, protocol_version=2))


@needs_kvm
def test_a_future_source_downgrades_to_a_version_1_destination(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, vmm_factory: Any, sockdir: Path
) -> None:
    """A version-2 source (this process, faked) hands off to a real version-1 VMM: it speaks
    version 1 and writes the component version 2 added as optional, so the older VMM takes
    the guest."""
    mig, api = sockdir / "mig.sock", sockdir / "api.sock"
    dest = vmm_factory(
        "run",
        "--incoming",
        f"unix:{mig}",
        "--api-socket",
        str(api),
        "--serial",
        "none",
        name="dest",
        wait_path=mig,
    )
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 2)
    monkeypatch.setattr(state, "ADDED_IN", {"future": 2})
    machine._device_state["future"] = _Future()  # type: ignore[assignment]
    machine.start()
    deadline = time.monotonic() + 20
    while layout.read_slot(machine.memory.buffer, 0).counter == 0:
        assert time.monotonic() < deadline, "the guest did not start counting"
        time.sleep(0.01)
    sender = Sender(machine, f"unix:{mig}")
    sender.run()
    assert sender.protocol_version == 1
    wait_for_path(api, dest)
    with QmpClient(api) as qmp:
        assert qmp.execute("query-status")["status"] == "running"
        qmp.execute("quit")
    assert dest.wait(10) == 0
    assert "hand-off: protocol version 1 (the source speaks protocol versions 1 to 2)" in (
        dest.log.read_text()
    )


@needs_kvm
def test_a_source_that_shares_no_version_stops_before_the_pause(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, vmm_factory: Any, sockdir: Path
) -> None:
    mig = sockdir / "mig.sock"
    vmm_factory(
        "run",
        "--incoming",
        f"unix:{mig}",
        "--api-socket",
        str(sockdir / "api.sock"),
        name="dest",
        wait_path=mig,
    )
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 3)
    monkeypatch.setattr(protocol, "OLDEST_PROTOCOL_VERSION", 2)
    machine.start()
    sender = Sender(machine, f"unix:{mig}")
    with pytest.raises(MigrationFailed, match="at start") as failed:
        sender.run()
    assert "protocol versions 2 to 3" in str(failed.value)
    assert "speaks protocol version 1" in str(failed.value)
    assert machine.status == "running" and not sender.committed


def test_every_version_spoken_has_a_state_format() -> None:
    versions = protocol.spoken()
    assert set(state.STATE_MINOR) == set(range(versions.low, versions.high + 1))
    assert state.STATE_MINOR[protocol.PROTOCOL_VERSION] == envelope.MINOR
