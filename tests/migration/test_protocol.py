"""The receiver's state machine and the baton, driven message by message over a socketpair."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from support import PATIENCE, needs_kvm

from intrahost.migration import protocol
from intrahost.migration.protocol import (
    Baton,
    Channel,
    Command,
    PeerRefused,
    ProtocolError,
    Status,
)
from intrahost.migration.receiver import ReceiveOptions, Receiver, ReceiveState
from intrahost.migration.state import save_machine
from intrahost.vmm.machine import Machine, MachineConfig
from intrahost.vmm.memory import GuestMemory, MiB


class Session:
    """A Receiver on one end of a socketpair, run in a thread; the test is the source."""

    def __init__(self, options: ReceiveOptions | None = None) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.source = Channel(a, timeout=PATIENCE)
        self.receiver = Receiver(Channel(b, timeout=5), options or ReceiveOptions(timeout=5))
        self.result: object = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.baton = Baton.create()

    def _run(self) -> None:
        self.result = self.receiver.run()

    def finish(self) -> None:
        self.source.close()
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive()


@pytest.fixture
def session() -> Iterator[Session]:
    s = Session()
    yield s
    s.finish()
    s.baton.close()
    if s.result is not None:
        s.result.close()  # type: ignore[attr-defined]


def start(s: Session, version: int = protocol.PROTOCOL_VERSION) -> dict[str, object]:
    return s.source.request(Command.START, protocol.to_json({"version": version}), [s.baton.fd])


def test_version_n_is_accepted_and_others_refused(session: Session) -> None:
    assert start(session)["version"] == protocol.PROTOCOL_VERSION
    other = Session()
    try:
        with pytest.raises(PeerRefused, match="protocol version 99 is not accepted"):
            start(other, 99)
        other.thread.join(PATIENCE)
        assert other.receiver.state is ReceiveState.FAILED
    finally:
        other.finish()


def test_start_names_the_features_a_sender_may_use(session: Session) -> None:
    """A sender passes a pty console's fd only to a destination that lists the feature (an
    older destination, which lists none, would refuse the unknown CONSOLE_FD)."""
    assert protocol.CONSOLE_FD_FEATURE in start(session)["features"]


def test_unexpected_message_names_state_and_message(session: Session) -> None:
    start(session)
    with pytest.raises(PeerRefused, match="can't handle STATE in receive state started"):
        session.source.request(Command.STATE, b"")
    session.thread.join(PATIENCE)
    assert session.receiver.state is ReceiveState.FAILED
    # The failed receiver made sure the baton can never say COMMITTED.
    assert session.baton.read() == Baton.ABANDONED


def test_memory_that_is_not_a_file_is_refused(session: Session) -> None:
    start(session)
    r, w = os.pipe()
    try:
        with pytest.raises(PeerRefused, match=r"does not hold|not backed"):
            session.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [r])
    finally:
        os.close(r)
        os.close(w)


def test_config_without_memory_is_refused(session: Session) -> None:
    start(session)
    config = MachineConfig(memory=16 * MiB).to_dict()
    with pytest.raises(PeerRefused, match="not fd-backed"):
        session.source.request(Command.CONFIG, protocol.to_json(config))


def test_memory_smaller_than_announced_is_refused(session: Session) -> None:
    start(session)
    with (
        GuestMemory.create(16 * MiB) as mem,
        pytest.raises(PeerRefused, match="does not hold the announced"),
    ):
        session.source.request(Command.MEMORY_FD, protocol.to_json({"size": 32 * MiB}), [mem.fd])


def test_guest_visible_override_is_refused_naming_the_flag() -> None:
    s = Session(ReceiveOptions(overrides={"vcpus": 2, "serial": "none"}, timeout=5))
    try:
        start(s)
        with GuestMemory.create(16 * MiB) as mem:
            s.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [mem.fd])
        config = MachineConfig(memory=16 * MiB, vcpus=1).to_dict()
        with pytest.raises(PeerRefused, match="--vcpus"):
            s.source.request(Command.CONFIG, protocol.to_json(config))
    finally:
        s.finish()
        s.baton.close()


def test_a_memory_path_override_is_refused() -> None:
    """The new VMM can't move guest memory to another file: a --memory-path that differs
    from the memory the source sends is refused, naming the flag (it was silently ignored)."""
    s = Session(ReceiveOptions(overrides={"memory_path": "/dev/shm/other", "serial": "none"}))
    try:
        start(s)
        with GuestMemory.create(16 * MiB) as mem:
            s.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [mem.fd])
        config = MachineConfig(memory=16 * MiB).to_dict()
        with pytest.raises(PeerRefused, match="--memory-path"):
            s.source.request(Command.CONFIG, protocol.to_json(config))
    finally:
        s.finish()
        s.baton.close()


def test_abandon_is_accepted_in_any_state(session: Session) -> None:
    start(session)
    session.source.request(Command.ABANDON)
    session.thread.join(PATIENCE)
    assert session.receiver.state is ReceiveState.ABANDONED
    assert session.result is None


def test_eof_mid_protocol_discards(session: Session) -> None:
    start(session)
    session.source.close()
    session.thread.join(PATIENCE)
    assert session.receiver.state is ReceiveState.FAILED
    assert "closed" in (session.receiver.error or "")


def test_unknown_command_and_bad_fd_count(session: Session) -> None:
    start(session)
    session.source.send(42, b"{}")
    reply = session.source.receive()
    assert reply.kind == Status.ERROR
    assert "unknown command 42" in json.loads(reply.payload)["error"]


@needs_kvm
def test_a_state_that_does_not_import_is_refused_and_nothing_runs() -> None:
    s = Session(ReceiveOptions(overrides={"serial": "none"}, timeout=5))
    mem = GuestMemory.create(16 * MiB)
    try:
        start(s)
        s.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [mem.fd])
        config = MachineConfig(memory=16 * MiB, guest="hello", serial="none").to_dict()
        s.source.request(Command.CONFIG, protocol.to_json(config))
        s.source.request(Command.READY)
        with pytest.raises(PeerRefused, match="cannot import the state"):
            s.source.request(Command.STATE, b"IHSTATE\0garbage")
        s.thread.join(PATIENCE)
        assert s.receiver.machine is None and s.result is None
        assert s.baton.read() == Baton.ABANDONED
    finally:
        s.finish()
        s.baton.close()
        mem.close()


@needs_kvm
@pytest.mark.parametrize("state_vcpus", [1, 2])
def test_the_states_configuration_must_be_the_configs(state_vcpus: int) -> None:
    """READY precomputes the CONFIG's configuration as the state carries it; a state with
    that configuration imports, one whose guest-visible fields differ is refused."""
    s = Session(ReceiveOptions(overrides={"serial": "none"}, timeout=5))
    mem = GuestMemory.create(16 * MiB)
    config = MachineConfig(memory=16 * MiB, guest="hello", serial="none")
    try:
        start(s)
        s.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [mem.fd])
        s.source.request(Command.CONFIG, protocol.to_json(config.to_dict()))
        s.source.request(Command.READY)
        saved = dataclasses.replace(config, vcpus=state_vcpus)
        other = Machine(saved, GuestMemory(os.dup(mem.fd), 16 * MiB))
        try:
            other.uart.pause()
            state = save_machine(other, running=False)
        finally:
            other.close()
        if state_vcpus == 1:
            s.source.request(Command.STATE, state)
            s.source.request(Command.COMMIT, protocol.to_json({"running": False}))
            s.thread.join(PATIENCE)
            assert s.receiver.state is ReceiveState.COMMITTED
        else:
            with pytest.raises(PeerRefused, match="configuration differs from the CONFIG"):
                s.source.request(Command.STATE, state)
            s.thread.join(PATIENCE)
            assert s.result is None and s.baton.read() == Baton.ABANDONED
    finally:
        s.finish()
        s.baton.close()
        if s.result is not None:
            s.result.close()  # type: ignore[attr-defined]
        mem.close()


def test_baton_swap_is_exclusive_across_processes() -> None:
    baton = Baton.create()
    pid = os.fork()
    if pid == 0:
        found = baton.swap(Baton.PENDING, Baton.COMMITTED)
        os._exit(0 if found == Baton.PENDING else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert baton.swap(Baton.PENDING, Baton.ABANDONED) == Baton.COMMITTED
    assert baton.read() == Baton.COMMITTED
    baton.close()


def test_url_must_be_unix() -> None:
    assert protocol.parse_url("unix:/tmp/x") == "/tmp/x"
    for url in ("tcp:host:1", "/tmp/x", "unix:"):
        with pytest.raises(ProtocolError, match="unix:PATH"):
            protocol.parse_url(url)
