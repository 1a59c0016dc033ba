"""Bad input for the destination of a hand-off: property-based fuzzing with hypothesis.

(a) ``envelope.decode`` on arbitrary bytes, on envelopes with random bodies behind a valid
    header, and on real envelopes mutated byte by byte (flips, truncation, insertion,
    deletion, duplication, splices; the checksum mostly recomputed so that the mutation
    reaches the component parser): a State or StateFormatError, and what decodes re-encodes
    to the same components.
(b) ``decode_state`` and the per-component parsers (``config_of``, ``decode_vcpu``,
    ``decode_vm``, the device records) on real states with components dropped, resized,
    rewritten, renamed or added; then ``restore_machine`` into a real, never-run machine:
    StateFormatError or StateImportError only (a device record's own parser: its own error).
(c) the Receiver, on one end of a socketpair, fed a correct hand-off cut short with some of
    its frames changed and arbitrary frames after it (any command number, payload, fds of
    any kind, headers that lie about the length or the fd count), then EOF or silence. It
    must: return from ``run()`` (never raise) within its timeouts; end FAILED or ABANDONED
    (COMMITTED only after a valid hand-off); answer every well-framed message it read, a
    refused one with an error reply; leave no fd it received open; never leave a baton saying
    COMMITTED unless it committed; refuse a frame that announces more than the cap without
    allocating it (tracemalloc).

Seeds are real saved states: the format fixtures in fixtures/ and, on /dev/kvm, states a
counter guest writes at module start (1 and 2 vCPUs).

Budget. In ``make test`` every test has a fixed number of examples (about 2,500 in all) and
the module takes about 15 s on an idle 2-CPU host, 40 s on a busy one. For a longer run,
multiply every budget:

    INTRAHOST_FUZZ_SCALE=50 .venv/bin/pytest tests/migration/test_fuzz.py \\
        --hypothesis-show-statistics -p no:cacheprovider

The bugs the fuzzing found are listed in ``fuzzkit.KNOWN_BUGS``, each pinned down by a
``test_bug_*`` test below; all are fixed, and the fuzz tests tolerate none of them (nor do they
spare the receiver non-memfd batons). ``INTRAHOST_FUZZ_STRICT=0`` tolerates them again, to tell
a regression of a known bug from a new one. The test session's summary prints examples and
time per fuzz test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import fuzzkit
import pytest
from fuzzkit import Frame, Seed, Session
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import HAVE_KVM, PATIENCE, needs_kvm

from intrahost.migration import envelope, protocol
from intrahost.migration.envelope import Component, StateFormatError
from intrahost.migration.protocol import FRAME, Baton, Channel, Command
from intrahost.migration.receiver import ReceiveOptions, Receiver, ReceiveState
from intrahost.migration.state import (
    UNDERSTOOD,
    StateImportError,
    config_of,
    decode_state,
    restore_machine,
)
from intrahost.vmm.devices.debugport import DebugPortState, DebugPortStateError
from intrahost.vmm.devices.uart import UartState, UartStateError
from intrahost.vmm.kvm_state import decode_vcpu, decode_vm
from intrahost.vmm.machine import Machine, MachineConfig, MachineConfigError
from intrahost.vmm.memory import GuestMemory
from intrahost.vmm.persist import Parts

#: test name -> [examples, seconds, {known bug: times tolerated}]; printed by conftest.
STATS: dict[str, list[Any]] = {}

SEEDS = fuzzkit.real_seeds(HAVE_KVM)


def budget(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples * fuzzkit.SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


@pytest.fixture
def stats(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    entry = STATS.setdefault(request.node.name, [0, 0.0, {}])
    t0 = time.monotonic()

    def count(*known: str) -> None:
        entry[0] += 1
        for name in known:
            entry[2][name] = entry[2].get(name, 0) + 1

    yield count
    entry[1] += time.monotonic() - t0


seeds = st.sampled_from(SEEDS)


# --- (a) the envelope ---------------------------------------------------------------------------


def _decode_or_refuse(data: bytes) -> envelope.State | None:
    try:
        state = envelope.decode(data)
    except StateFormatError:
        state = None
    with contextlib.suppress(StateFormatError):
        envelope.decode(data, UNDERSTOOD)
    return state


def _reencodes(state: envelope.State) -> None:
    again = envelope.decode(envelope.encode(state.components.values(), state.minor))
    assert again.components == state.components


@budget(600)
@given(data=st.binary(max_size=4096))
def test_decode_arbitrary_bytes(data: bytes, stats: Callable[..., None]) -> None:
    stats()
    state = _decode_or_refuse(data)
    if state is not None:
        _reencodes(state)


@budget(400)
@given(
    count=st.one_of(fuzzkit.EDGE_INTS.filter(lambda n: 0 <= n < 1 << 32), st.integers(0, 40)),
    body=st.binary(max_size=2048),
    major=st.sampled_from([envelope.MAJOR, 0, 2]),
)
def test_decode_random_bodies_behind_a_valid_header(
    count: int, body: bytes, major: int, stats: Callable[..., None]
) -> None:
    stats()
    header = envelope.HEADER.pack(envelope.MAGIC, major, 1, count, len(body), zlib.crc32(body))
    state = _decode_or_refuse(header + body)
    if state is not None:
        _reencodes(state)


@budget(400)
@given(data=st.data())
def test_decode_mutated_real_envelopes(data: st.DataObject, stats: Callable[..., None]) -> None:
    stats()
    seed: Seed = data.draw(seeds)
    other: Seed = data.draw(seeds)
    mutated = data.draw(fuzzkit.mutated_bytes(seed.state))
    if data.draw(st.integers(0, 9)) == 0:  # splice two real envelopes
        cut = data.draw(st.integers(0, len(mutated)))
        mutated = mutated[:cut] + other.state[cut:]
    state = _decode_or_refuse(mutated)
    event("decoded" if state is not None else "refused")
    if state is not None:
        _reencodes(state)


@budget(200)
@given(
    components=st.lists(
        st.builds(Component, fuzzkit.COMPONENT_NAMES, st.binary(max_size=64), st.booleans()),
        max_size=12,
        unique_by=lambda c: c.name,
    ),
    minor=st.integers(0, 0xFFFF),
)
def test_encode_decode_round_trip(
    components: list[Component], minor: int, stats: Callable[..., None]
) -> None:
    stats()
    state = envelope.decode(envelope.encode(components, minor))
    assert state.minor == minor
    assert list(state.components.values()) == components


@pytest.mark.parametrize(
    "payload",
    [b"[" * 100_000, b'{"a":' * 5000 + b"}" * 5000, b'{"a":' + b"1" * 5000 + b"}", b"\xff"],
    ids=["deep-array", "deep-object", "huge-number", "not-utf8"],
)
def test_a_json_component_that_json_cannot_read_is_a_format_error(payload: bytes) -> None:
    state = envelope.decode(envelope.encode([Component("config", payload)]))
    with pytest.raises(StateFormatError, match="component 'config'"):
        state.need_json("config")


# --- (b) the state parsers ----------------------------------------------------------------------

ALLOWED = (StateFormatError, StateImportError)


def _parse_everything(data: bytes, vcpus: int) -> list[str]:
    """Run every parser on ``data``; the names of those that accepted it. Any exception
    other than ALLOWED (and a device record's own error) propagates."""
    try:
        state = decode_state(data)
    except StateFormatError:
        return []
    accepted = ["envelope"]
    try:
        config_of(state)
        accepted.append("config")
    except ALLOWED:
        pass
    for i in range(vcpus + 1):
        try:
            decode_vcpu(Parts(state, f"vcpu/{i}"), i)
            accepted.append(f"vcpu{i}")
        except ALLOWED:
            pass
    try:
        decode_vm(Parts(state, "vm"))
        accepted.append("vm")
    except ALLOWED:
        pass
    for name, parse, own in (
        ("device/uart", UartState.from_dict, UartStateError),
        ("device/debug", DebugPortState.from_dict, DebugPortStateError),
    ):
        try:
            parse(state.need_json(name))
            accepted.append(name)
        except (*ALLOWED, own):
            pass
    return accepted


@budget(300)
@given(data=st.data())
def test_state_parsers_refuse_cleanly(data: st.DataObject, stats: Callable[..., None]) -> None:
    seed: Seed = data.draw(seeds)
    mutated = data.draw(fuzzkit.mutated_state(seed))
    known = []
    try:
        accepted = _parse_everything(mutated, seed.vcpus)
    except MachineConfigError:
        if fuzzkit.STRICT:
            raise
        known.append("config-error-type")
        accepted = []
    stats(*known)
    event(f"parsers that accepted: {len(accepted)}")


@pytest.fixture(scope="module")
def machines() -> Iterator[dict[int, Machine]]:
    """One never-run machine per vCPU count of the seeds: the import target."""
    built: dict[int, Machine] = {}
    for seed in SEEDS:
        if seed.vcpus not in built:
            config = MachineConfig.from_dict(seed.config | {"serial": "none"})
            built[seed.vcpus] = Machine(config, GuestMemory.create(config.memory))
    yield built
    for machine in built.values():
        machine.close()


@needs_kvm
@budget(300)
@given(data=st.data())
def test_restore_refuses_cleanly(
    data: st.DataObject, machines: dict[int, Machine], stats: Callable[..., None]
) -> None:
    seed: Seed = data.draw(seeds)
    mutated = data.draw(fuzzkit.mutated_state(seed))
    known = []
    try:
        state = decode_state(mutated)
        restore_machine(machines[seed.vcpus], state)
        event("imported")
    except ALLOWED as e:
        event(f"refused: {type(e).__name__}")
    except Exception as e:
        bug = _known_restore_bug(e)
        if bug is None:
            raise
        known.append(bug)
    stats(*known)


def _known_restore_bug(e: Exception) -> str | None:
    if fuzzkit.STRICT:
        return None
    if isinstance(e, ValueError) and "bytes, got" in str(e):
        return "raw-size-unchecked"
    if isinstance(e, ValueError) and "invalid literal for int()" in str(e):
        return "vcpu-name-unchecked"
    if isinstance(e, MachineConfigError):
        return "config-error-type"
    return None


# --- (c) the receiver ---------------------------------------------------------------------------


@needs_kvm
@budget(200)
@given(session=fuzzkit.sessions(SEEDS))
def test_receiver_survives_arbitrary_frames(session: Session, stats: Callable[..., None]) -> None:
    outcome = fuzzkit.run_session(session)
    broken = fuzzkit.unexplained(outcome)
    stats(*fuzzkit.explained_by(outcome))
    event(f"ended {outcome.state.value}")
    event(f"responses: {len(outcome.responses)}")
    assert not broken, f"{session.describe()}\n  " + "\n  ".join(f"{r}: {d}" for r, d in broken)


def _receiver(
    timeout: float = 2.0,
) -> tuple[socket.socket, Receiver, threading.Thread, dict[str, Any]]:
    ours, theirs = socket.socketpair()
    receiver = Receiver(
        Channel(theirs, timeout),
        ReceiveOptions(overrides={"serial": "none"}, timeout=timeout, state_timeout=timeout),
    )
    box: dict[str, Any] = {}

    def serve() -> None:
        try:
            box["machine"] = receiver.run()
        except BaseException as e:
            box["escaped"] = e
        finally:
            receiver.channel.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ours, receiver, thread, box


def test_a_huge_announced_payload_is_refused_without_allocating_it() -> None:
    before = fuzzkit.open_fds()
    tracemalloc.start()
    try:
        ours, receiver, thread, box = _receiver()
        # A START that announces 60 GiB: the receiver must refuse from the header alone.
        ours.sendall(FRAME.pack(Command.START, 0, 0, 60 << 30) + b"{}")
        thread.join(PATIENCE)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not thread.is_alive() and "escaped" not in box
    assert receiver.state is ReceiveState.FAILED
    assert str(60 << 30) in (receiver.error or ""), receiver.error
    assert peak < 1 << 20, f"{peak} bytes allocated for a refused header"
    ours.close()
    assert fuzzkit.open_fds() == before


def test_a_payload_under_the_cap_is_read_as_it_arrives() -> None:
    """A frame that announces just under the cap and sends 1 KiB, then stops: memory follows
    what arrived, not what was announced."""
    tracemalloc.start()
    try:
        ours, receiver, thread, _box = _receiver(timeout=0.5)
        ours.sendall(FRAME.pack(Command.START, 0, 0, protocol.MAX_PAYLOAD) + b"x" * 1024)
        thread.join(PATIENCE)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert receiver.state is ReceiveState.FAILED and "timed out" in (receiver.error or "")
    assert peak < 4 << 20
    ours.close()


def test_an_envelope_claiming_huge_counts_is_refused_without_allocating() -> None:
    tracemalloc.start()
    try:
        for count, payload_len in ((0xFFFF_FFFF, 8), (1, 0xFFFF_FFFF), (8192, 0xFFFF_FFFF)):
            body = struct.pack("<HHI", 6, 1, payload_len) + b"config" + b"{}"
            header = envelope.HEADER.pack(
                envelope.MAGIC, envelope.MAJOR, 1, count, len(body), zlib.crc32(body)
            )
            with pytest.raises(StateFormatError):
                envelope.decode(header + body)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_more_fds_than_a_message_may_carry_are_all_closed() -> None:
    before = fuzzkit.open_fds()
    ours, receiver, thread, box = _receiver()
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(40)]
    header = FRAME.pack(Command.START, len(fds), 0, 2)
    ours.sendmsg(
        [header + b"{}"],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))],
    )
    for fd in fds:
        os.close(fd)
    thread.join(PATIENCE)
    ours.close()
    assert "escaped" not in box and receiver.state is ReceiveState.FAILED
    assert "fds" in (receiver.error or ""), receiver.error
    assert fuzzkit.open_fds() == before


@needs_kvm
@budget(120)
@given(session=fuzzkit.state_sessions(SEEDS))
def test_receiver_imports_or_refuses_near_real_states(
    session: Session, stats: Callable[..., None]
) -> None:
    outcome = fuzzkit.run_session(session)
    broken = fuzzkit.unexplained(outcome)
    stats(*fuzzkit.explained_by(outcome))
    event(f"ended {outcome.state.value}")
    assert not broken, f"{session.describe()}\n  " + "\n  ".join(f"{r}: {d}" for r, d in broken)


# --- the bugs the fuzzing found -----------------------------------------------------------------
# Each pins down a bug the fuzzing found (now fixed): it must keep passing.


def _seed() -> Seed:
    return SEEDS[-1]


def _session(*frames: Frame, ending: str = "eof") -> Session:
    return Session(_seed(), frames, ending)


def _prefix(n: int) -> list[Frame]:
    return fuzzkit.valid_prefix(_seed())[:n]


def _assert_clean(outcome: fuzzkit.Outcome) -> None:
    broken = fuzzkit.violations(outcome)
    assert not broken, "\n".join(f"{r}: {d}" for r, d in broken)


def _state_with(change: Callable[[list[Component]], list[Component]]) -> bytes:
    components = list(envelope.decode(_seed().state).components.values())
    return envelope.encode(change(components))


def _replace(name: str, payload: bytes) -> Callable[[list[Component]], list[Component]]:
    return lambda cs: [Component(c.name, payload, c.required) if c.name == name else c for c in cs]


@pytest.mark.parametrize(
    "payload",
    [b"nope", b"[1]", b"[" * 100_000, b'{"version":' + b"1" * 5000 + b"}"],
    ids=["garbage", "array", "deep", "huge-number"],
)
def test_bug_payload_not_json_gets_no_error_reply(payload: bytes) -> None:
    start = Frame(Command.START, payload, ("baton",))
    _assert_clean(fuzzkit.run_session(_session(start)))


def test_bug_memory_fd_with_a_bad_payload_leaks_the_fd() -> None:
    memory_fd = Frame(Command.MEMORY_FD, b"not json", ("memory",))
    outcome = fuzzkit.run_session(_session(*_prefix(1), memory_fd))
    assert not outcome.leaked_fds, outcome.leaked_fds


def test_bug_start_version_of_the_wrong_type() -> None:
    start = Frame(Command.START, fuzzkit.to_json({"version": [1]}), ("baton",))
    _assert_clean(fuzzkit.run_session(_session(start)))


@needs_kvm
@pytest.mark.parametrize("name", ["vm/clock", "vcpu/0/regs", "vcpu/0/cpuid", "vcpu/0/events"])
def test_bug_raw_component_of_the_wrong_size(name: str) -> None:
    state = _state_with(lambda cs: [
        Component(c.name, c.payload[:-1], c.required) if c.name == name else c for c in cs
    ])  # fmt: skip
    frames = [*_prefix(4), Frame(Command.STATE, state)]
    _assert_clean(fuzzkit.run_session(_session(*frames)))


@needs_kvm
def test_bug_vcpu_component_name_not_a_number() -> None:
    state = _state_with(lambda cs: [*cs, Component("vcpu/x/regs", b"", required=False)])
    frames = [*_prefix(4), Frame(Command.STATE, state)]
    _assert_clean(fuzzkit.run_session(_session(*frames)))


@needs_kvm
def test_bug_state_config_of_the_wrong_type() -> None:
    config = _seed().config | {"serial": 5}
    state = _state_with(_replace("config", fuzzkit.to_json(config)))
    frames = [*_prefix(4), Frame(Command.STATE, state)]
    _assert_clean(fuzzkit.run_session(_session(*frames)))


@needs_kvm
def test_bug_run_state_that_is_not_json() -> None:
    state = _state_with(_replace("vmm/run-state", b"not json"))
    frames = [*_prefix(4), Frame(Command.STATE, state)]
    _assert_clean(fuzzkit.run_session(_session(*frames)))


def test_bug_config_of_raises_machine_config_error() -> None:
    state = decode_state(_state_with(_replace("config", b'{"vcpus": "two"}')))
    with pytest.raises(StateFormatError):
        config_of(state)


@pytest.mark.parametrize("kind", fuzzkit.BAD_BATONS)
def test_bug_baton_not_a_memfd(kind: str) -> None:
    start = Frame(Command.START, fuzzkit.to_json({"version": 99}), (kind,))
    _assert_clean(fuzzkit.run_session(_session(start)))


def test_bug_a_peer_holding_the_baton_lock_stalls_the_receiver() -> None:
    import fcntl

    baton = Baton.create()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "source": takes the lock and keeps it until the test is done
        os.close(done_w)
        fcntl.lockf(baton.fd, fcntl.LOCK_EX)
        os.write(ready_w, b"x")
        os.read(done_r, 1)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        ours, receiver, thread, _box = _receiver(timeout=0.5)
        ours.sendmsg(
            [FRAME.pack(Command.START, 1, 0, 2) + b"{}"],  # no version: refused
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", baton.fd))],
        )
        t0 = time.monotonic()
        thread.join(PATIENCE)
        elapsed = time.monotonic() - t0
        ended_while_locked = not thread.is_alive()
        ours.close()
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        baton.close()
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    assert ended_while_locked, "the receiver waited for the lock the peer still holds"
    assert receiver.state is ReceiveState.FAILED
    # It gave up on the lock after its own timeout (0.5 s), not the default one.
    assert elapsed < protocol.DEFAULT_TIMEOUT, f"the refusal took {elapsed:.1f} s"
