"""The fuzzing kit of migration/test_fuzz.py: real saved states as seeds, hypothesis strategies for
envelopes, state components and hand-off frames, and a harness that runs one Receiver over a
socketpair and reports what it did.

Nothing here asserts; :func:`violations` turns an :class:`Outcome` into the list of broken
rules, and :data:`KNOWN_BUGS` names the ones the tests tolerate (each has a strict xfail test
in test_fuzz.py and is reported with its fix) unless ``INTRAHOST_FUZZ_STRICT=1``.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import functools
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from support import PATIENCE, wait_until

from intrahost.migration import envelope, protocol
from intrahost.migration.envelope import Component
from intrahost.migration.protocol import FRAME, Baton, Channel, Command, Status
from intrahost.migration.receiver import ReceiveOptions, Receiver, ReceiveState

FIXTURES = Path(__file__).resolve().parent / "migration" / "fixtures"
MiB = 1 << 20
PAGE = 4096

#: INTRAHOST_FUZZ_SCALE multiplies every example budget (see test_fuzz.py's docstring).
SCALE = max(1, int(os.environ.get("INTRAHOST_FUZZ_SCALE", "1")))
#: Tolerate none of KNOWN_BUGS (all fixed; INTRAHOST_FUZZ_STRICT=0 tolerates them again, to
#: tell a regression of a known bug from a new one).
STRICT = os.environ.get("INTRAHOST_FUZZ_STRICT", "1") == "1"


# --- seeds: real saved states ------------------------------------------------------------------


class Blob(bytes):
    """Bytes with a short repr: hypothesis prints strategies' arguments in its reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


class Seed:
    """A real saved state, the guest memory it belongs with, and its machine config. (Not a
    dataclass: hypothesis would print every field of one in its reports.)"""

    def __init__(
        self,
        name: str,
        state: bytes,
        memory_size: int,
        pages: tuple[tuple[int, bytes], ...],
        config: dict[str, Any],
    ) -> None:
        self.name = name
        self.state = state
        self.memory_size = memory_size
        #: The non-zero pages of the guest memory, (offset, bytes): a new memfd is all zeros.
        self.pages = pages
        self.config = config

    @property
    def vcpus(self) -> int:
        return int(self.config["vcpus"])

    def __repr__(self) -> str:
        return f"<seed {self.name}>"


def _pages(image: bytes) -> tuple[tuple[int, bytes], ...]:
    zero = bytes(PAGE)
    return tuple(
        (off, image[off : off + PAGE])
        for off in range(0, len(image), PAGE)
        if image[off : off + PAGE] != zero
    )


def _seed(name: str, state: bytes, image: bytes) -> Seed:
    config = envelope.decode(state).need_json("config")
    return Seed(name, Blob(state), len(image), _pages(image), config)


@functools.cache
def real_seeds(with_kvm: bool) -> tuple[Seed, ...]:
    """The format fixtures, and (with /dev/kvm) states a counter guest writes right now on 1
    and 2 vCPUs: the seed corpus, as a real hand-off produces it."""
    seeds = [
        _seed(
            p.stem,
            p.read_bytes(),
            zlib.decompress((FIXTURES / p.name.replace("state-", "memory-")).with_suffix(".zlib")
                            .read_bytes()),
        )
        for p in sorted(FIXTURES.glob("state-*.bin"))
    ]  # fmt: skip
    if with_kvm:
        from intrahost.migration.state import save_machine
        from intrahost.vmm.guests import layout
        from intrahost.vmm.machine import Machine, MachineConfig

        for vcpus in (1, 2):
            config = MachineConfig(
                memory=16 * MiB, vcpus=vcpus, guest_args="progress=1048576", serial="none"
            )
            machine = Machine.create(config)

            def counting(machine: Machine = machine, vcpus: int = vcpus) -> bool:
                try:
                    status = layout.read_status(machine.memory.buffer)
                except layout.GuestStatusMissing:
                    return False
                return status.running == vcpus and all(s.counter for s in status.slots)

            try:
                machine.start()
                wait_until(counting, f"the counter guest to count on {vcpus} vCPUs")
                machine.pause()
                state = save_machine(machine)
                image = bytes(machine.memory.buffer)
            finally:
                machine.close()
            seeds.append(_seed(f"live-{vcpus}cpu", state, image))
    return tuple(seeds)


# --- strategies: JSON, bytes, envelopes ---------------------------------------------------------

#: Integers that break things: signs, widths, bools' neighbours, sizes around the caps.
EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 8, 255, 256, 4095, 4096, 65535, 65536, 1 << 31, (1 << 31) - 1, 1 << 32,
     (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63), 16 * MiB, 16 * MiB - 1,
     protocol.MAX_PAYLOAD, protocol.MAX_PAYLOAD + 1, 60 << 30, 10**30]
)  # fmt: skip
INTS = st.one_of(EDGE_INTS, st.integers())
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(max_size=20)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def to_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


#: Payloads that are not a JSON object: garbage, other JSON values, bad UTF-8, deep nesting.
NOT_AN_OBJECT = st.one_of(
    st.binary(max_size=64),
    JSON.filter(lambda v: not isinstance(v, dict)).map(to_json),
    st.just(b"\xff\xfe{}"),
    st.just(b"[" * 5000 + b"]" * 5000),
    st.just(b'{"a":' * 3000 + b"1" + b"}" * 3000),
    st.just(b'{"version":' + b"1" * 5000 + b"}"),  # int() refuses over 4300 digits
)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, fix_crc: bool | None = None) -> bytes:
    """``data`` with a few byte-level mutations: flips, truncation, insertion, deletion,
    duplication, and a splice with other data. For an envelope, the header's length and
    checksum are then (mostly) recomputed, so the mutation reaches the component parser."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup", "splice"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        elif op == "dup":
            n = draw(st.integers(1, 256))
            out[at:at] = out[at : at + n]
        elif op == "splice":
            out[at:] = draw(st.binary(max_size=128))
    if fix_crc is None:
        fix_crc = draw(st.integers(0, 9)) < 8
    if fix_crc and len(out) >= envelope.HEADER.size:
        body = bytes(out[envelope.HEADER.size :])
        magic, major, minor, count, _len, _crc = envelope.HEADER.unpack_from(out)
        out[: envelope.HEADER.size] = envelope.HEADER.pack(
            magic, major, minor, count, len(body), zlib.crc32(body)
        )
    return bytes(out)


COMPONENT_NAMES = st.one_of(
    st.sampled_from(
        ["config", "vm/meta", "vm/clock", "vm/pit", "vm/ioapic", "device/uart", "device/debug",
         "vmm/run-state", "sev/launch", "vcpu/0/meta", "vcpu/0/regs", "vcpu/0/lapic",
         "vcpu/1/sregs", "vcpu/63/regs", "vcpu/64/meta", "vcpu/99999999999999999999/x",
         "vcpu/", "vcpu//regs", "vcpu/x/regs", "vcpu/-1/regs", "vcpu/ 1/regs", "vcpu/0",
         "vcpu/\u0661/regs", "gpu/0", "x" * 128]
    ),
    st.text(min_size=1, max_size=40).filter(lambda s: 0 < len(s.encode()) <= 128),
)  # fmt: skip


@st.composite
def mutated_json_payload(draw: st.DrawFn, payload: bytes) -> bytes:
    """A JSON component with keys set to odd values, dropped or added."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict) or draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(NOT_AN_OBJECT, JSON.map(to_json)))
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(value)
        op = draw(st.sampled_from(["set", "drop", "add", "nest"]))
        if op == "set" and keys:
            value[draw(st.sampled_from(keys))] = draw(JSON)
        elif op == "drop" and keys:
            del value[draw(st.sampled_from(keys))]
        elif op == "add":
            value[draw(st.text(max_size=12))] = draw(JSON)
        elif op == "nest" and keys:
            key = draw(st.sampled_from(keys))
            inner = value[key]
            if isinstance(inner, list) and inner:
                i = draw(st.integers(0, len(inner) - 1))
                inner[i] = draw(JSON)
    return to_json(value)


@st.composite
def mutated_components(draw: st.DrawFn, state: bytes) -> list[Component]:
    """A real state's components with a few of them dropped, resized, rewritten or added."""
    components = list(envelope.decode(state).components.values())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "bytes", "resize", "json", "add", "flag", "rename"]))
        i = draw(st.integers(0, max(0, len(components) - 1)))
        if not components and op != "add":
            op = "add"
        if op == "drop":
            del components[i]
        elif op == "bytes":
            c = components[i]
            components[i] = c._replace(payload=draw(st.binary(max_size=2 * len(c.payload) + 8)))
        elif op == "resize":
            c = components[i]
            n = draw(
                st.sampled_from([0, 1, len(c.payload) - 1, len(c.payload) + 1, 2 * len(c.payload)])
            )
            components[i] = c._replace(payload=(c.payload * 3)[: max(0, n)])
        elif op == "json":
            c = components[i]
            components[i] = c._replace(payload=draw(mutated_json_payload(c.payload)))
        elif op == "add":
            name = draw(COMPONENT_NAMES)
            payload = draw(st.one_of(st.binary(max_size=64), JSON.map(to_json)))
            components.append(Component(name, payload, draw(st.booleans())))
        elif op == "flag":
            components[i] = components[i]._replace(required=not components[i].required)
        elif op == "rename":
            components[i] = components[i]._replace(name=draw(COMPONENT_NAMES))
    unique: dict[str, Component] = {}
    for c in components:
        unique.setdefault(c.name, c)
    return list(unique.values())


def mutated_state(seed: Seed) -> st.SearchStrategy[bytes]:
    """A state close to a real one: component-level or byte-level mutations."""
    return st.one_of(
        mutated_components(seed.state).map(envelope.encode),
        mutated_bytes(seed.state),
    )


# --- file descriptors a sender can pass ---------------------------------------------------------

#: Kinds of fd a frame can carry. "memory" is the seed's guest memory; batons are 8-byte
#: memfds; the rest are things a careless or hostile sender could pass instead.
GOOD_BATONS = ("baton", "baton-committed", "baton-empty", "memfd-small")
FD_KINDS = (*GOOD_BATONS, "memory", "pipe", "devnull", "dir", "rofile", "socket",
            "sealed-baton", "kvm")  # fmt: skip
#: fds whose use as the baton makes run() raise (test_fuzz.py::test_bug_baton_not_a_memfd):
#: sent as a baton only when STRICT.
BAD_BATONS = ("pipe", "dir", "rofile", "socket", "sealed-baton", "kvm")


class FdFactory:
    """Makes the fds a session sends; keeps a duplicate of every baton it made, to read the
    final word; closes everything it made in :meth:`close`."""

    def __init__(self, seed: Seed) -> None:
        self.seed = seed
        self.batons: list[tuple[str, int]] = []  # (kind, our duplicate)
        self._extra: list[int] = []

    def make(self, kind: str) -> int:
        if kind in ("baton", "baton-committed", "sealed-baton"):
            fd = os.memfd_create("fuzz-baton", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            word = Baton.COMMITTED if kind == "baton-committed" else Baton.PENDING
            os.pwrite(fd, struct.pack("<Q", word), 0)
            if kind == "sealed-baton":
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            self.batons.append((kind, os.dup(fd)))
            return fd
        if kind == "baton-empty":
            return os.memfd_create("fuzz-empty", os.MFD_CLOEXEC)
        if kind == "memfd-small":
            fd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, MiB)
            return fd
        if kind == "memory":
            fd = os.memfd_create("fuzz-memory", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.seed.memory_size)
            for off, page in self.seed.pages:
                os.pwrite(fd, page, off)
            return fd
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            self._extra.append(w)
            return r
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if kind == "dir":
            return os.open("/", os.O_RDONLY | os.O_CLOEXEC)
        if kind == "rofile":
            return os.open(FIXTURES / "make_fixture.py", os.O_RDONLY | os.O_CLOEXEC)
        if kind == "socket":
            s1, s2 = socket.socketpair()
            self._extra.append(s2.detach())
            return s1.detach()
        if kind == "kvm":
            return os.open(
                os.environ.get("INTRAHOST_KVM_DEVICE", "/dev/kvm"), os.O_RDWR | os.O_CLOEXEC
            )
        raise ValueError(kind)

    def baton_words(self) -> list[tuple[str, int]]:
        words = []
        for kind, fd in self.batons:
            baton = Baton(os.dup(fd))  # a Baton owns its fd and a lock fd of its own
            try:
                words.append((kind, baton.read()))
            finally:
                baton.close()
        return words

    def close(self) -> None:
        for _, fd in self.batons:
            os.close(fd)
        for fd in self._extra:
            os.close(fd)
        self.batons.clear()
        self._extra.clear()


# --- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One message a source could write: the header may lie about the payload or the fds."""

    kind: int
    payload: bytes = b""
    fds: tuple[str, ...] = ()
    #: None: the header tells the truth.
    announced_length: int | None = None
    announced_fds: int | None = None
    reserved: int = 0

    @property
    def well_formed(self) -> bool:
        return (
            self.announced_length in (None, len(self.payload))
            and self.announced_fds in (None, len(self.fds))
            and len(self.payload) <= protocol.MAX_PAYLOAD
            and len(self.fds) <= protocol.MAX_FDS
        )

    def header(self) -> bytes:
        length = len(self.payload) if self.announced_length is None else self.announced_length
        nfds = len(self.fds) if self.announced_fds is None else self.announced_fds
        return FRAME.pack(self.kind, nfds, self.reserved, length)

    def describe(self) -> str:
        try:
            name = Command(self.kind).name
        except ValueError:
            name = str(self.kind)
        lie = "" if self.well_formed else " (lying header)"
        return f"{name} {len(self.payload)}B fds={list(self.fds)}{lie}"


def valid_prefix(seed: Seed, copy: bool = False) -> list[Frame]:
    """The frames of a correct hand-off of ``seed``, as the sender writes them."""
    start = {"version": protocol.PROTOCOL_VERSION, "copy_memory": copy}
    frames = [Frame(Command.START, to_json(start), ("baton",))]
    if not copy:
        memory = {"size": seed.memory_size, "path": None}
        frames.append(Frame(Command.MEMORY_FD, to_json(memory), ("memory",)))
    frames += [Frame(Command.CONFIG, to_json(seed.config)), Frame(Command.READY)]
    if copy:
        off, page = seed.pages[0]
        frames.append(Frame(Command.MEMORY_DATA, struct.pack("<Q", off) + page))
    frames += [
        Frame(Command.STATE, seed.state),
        Frame(Command.COMMIT, to_json({"running": True})),
    ]
    return frames


def payloads(seed: Seed, kind: int) -> st.SearchStrategy[bytes]:
    """Plausible and implausible payloads for a message of ``kind``."""
    odd = st.one_of(NOT_AN_OBJECT, JSON.map(to_json), st.just(b""))
    if kind == Command.START:
        good = st.fixed_dictionaries(
            {"version": st.one_of(st.sampled_from([1, 0, 2, 99, "1", None, 1.0, True]), JSON)},
            optional={"copy_memory": JSON},
        ).map(to_json)
    elif kind == Command.MEMORY_FD:
        good = st.fixed_dictionaries(
            {"size": st.one_of(st.just(seed.memory_size), EDGE_INTS, JSON)},
            optional={"path": st.one_of(st.none(), st.text(max_size=30), JSON)},
        ).map(to_json)
    elif kind == Command.CONFIG:
        good = mutated_json_payload(to_json(seed.config))
    elif kind == Command.STATE:
        good = st.one_of(st.just(seed.state), mutated_state(seed))
    elif kind == Command.COMMIT:
        good = st.fixed_dictionaries({}, optional={"running": JSON}).map(to_json)
    elif kind == Command.MEMORY_DATA:
        good = st.builds(
            lambda off, data: struct.pack("<Q", off) + data,
            st.one_of(EDGE_INTS.filter(lambda i: 0 <= i < 1 << 64), st.integers(0, (1 << 64) - 1)),
            st.binary(max_size=PAGE),
        )
    else:
        good = st.just(b"")
    return st.one_of(good, good, good, odd)


def fd_lists(start: bool) -> st.SearchStrategy[tuple[str, ...]]:
    """fds for a frame; for START (the baton) only memfds unless STRICT (see BAD_BATONS)."""
    kinds = FD_KINDS if STRICT or not start else [k for k in FD_KINDS if k not in BAD_BATONS]
    return st.lists(st.sampled_from(kinds), max_size=3).map(tuple)


LYING_LENGTHS = st.sampled_from(
    [1, 7, 16, 100, protocol.MAX_PAYLOAD, protocol.MAX_PAYLOAD + 1, 60 << 30, (1 << 64) - 1]
)


@st.composite
def frames(draw: st.DrawFn, seed: Seed) -> Frame:
    """Any frame: a real or unknown command, a payload for it or not, any fds, and now and
    then a header that lies."""
    kind = draw(st.one_of(st.sampled_from(list(Command)), st.integers(0, 0xFFFF)))
    frame = Frame(int(kind), draw(payloads(seed, kind)), draw(fd_lists(kind == Command.START)))
    return draw(lie_sometimes(frame))


@st.composite
def lie(draw: st.DrawFn, frame: Frame) -> Frame:
    """The frame with a header that lies about its length or fds, or sets the reserved word."""
    what = draw(st.sampled_from(["length", "length", "fds", "reserved"]))
    if what == "length":
        delta = draw(st.one_of(LYING_LENGTHS, st.integers(-16, 16).filter(bool)))
        length = max(0, len(frame.payload) + delta) if abs(delta) <= 16 else delta
        if length == len(frame.payload):
            length += 1
        return replace(frame, announced_length=length)
    if what == "fds":
        nfds = draw(st.integers(0, 0xFFFF).filter(lambda n: n != len(frame.fds)))
        return replace(frame, announced_fds=nfds)
    return replace(frame, reserved=draw(st.integers(1, 0xFFFF_FFFF)))


@st.composite
def lie_sometimes(draw: st.DrawFn, frame: Frame) -> Frame:
    return draw(lie(frame)) if draw(st.integers(0, 9)) == 0 else frame


@st.composite
def mutated_frame(draw: st.DrawFn, frame: Frame, seed: Seed) -> Frame:
    """One change to a correct frame: its command, payload, fds or header."""
    what = draw(st.sampled_from(["kind", "payload", "payload", "fds", "header"]))
    if what == "kind":
        return replace(frame, kind=draw(st.integers(0, 12)))
    if what == "payload":
        return replace(frame, payload=draw(payloads(seed, frame.kind)))
    if what == "fds":
        return replace(frame, fds=draw(fd_lists(frame.kind == Command.START)))
    return draw(lie(frame))


@dataclass(frozen=True)
class Session:
    seed: Seed
    frames: tuple[Frame, ...]
    #: "eof": the source shuts its side after the last frame; "hold": it stays silent.
    ending: str

    def __repr__(self) -> str:
        return f"<session {self.describe()}>"

    def describe(self) -> str:
        steps = "; ".join(f.describe() for f in self.frames)
        return f"[{self.seed.name}] {steps} -> {self.ending}"


@st.composite
def sessions(draw: st.DrawFn, seeds: Sequence[Seed]) -> Session:
    """A correct hand-off cut short, with a few of its frames changed and a few arbitrary
    frames after it: this reaches every receive state, and the import of near-real states
    (half of the sessions run the correct hand-off up to STATE or COMMIT)."""
    seed = draw(st.sampled_from(seeds))
    prefix = valid_prefix(seed, copy=draw(st.integers(0, 7)) == 0)
    deep = st.sampled_from([len(prefix) - 1, len(prefix)])
    chosen = prefix[: draw(st.one_of(deep, st.integers(0, len(prefix))))]
    for _ in range(draw(st.integers(0, 2))):
        if chosen:
            # The last frame is the likeliest target: the ones before it let it be read.
            last = st.just(len(chosen) - 1)
            i = draw(st.one_of(last, st.integers(0, len(chosen) - 1)))
            chosen[i] = draw(mutated_frame(chosen[i], seed))
    chosen += draw(st.lists(frames(seed), max_size=3))
    ending = draw(st.sampled_from(["eof"] * 9 + ["hold"]))
    return Session(seed, tuple(chosen), ending)


@st.composite
def state_sessions(draw: st.DrawFn, seeds: Sequence[Seed]) -> Session:
    """A correct hand-off whose STATE is a near-real state (then COMMIT, or EOF)."""
    seed = draw(st.sampled_from(seeds))
    prefix = valid_prefix(seed)
    state = replace(prefix[-2], payload=draw(mutated_state(seed)))
    tail = [prefix[-1]] if draw(st.booleans()) else []
    return Session(seed, (*prefix[:-2], state, *tail), "eof")


# --- the harness --------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@dataclass
class Outcome:
    session: Session
    state: ReceiveState
    error: str | None
    escaped: BaseException | None
    hung: bool
    #: Frames written completely before the receiver hung up.
    sent: int
    #: (status, payload) of every response, or a description of a malformed one.
    responses: list[tuple[int, bytes]]
    malformed_response: str | None
    leaked_fds: list[str]
    baton_words: list[tuple[str, int]]
    committed_machine: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


def send_frame(sock: socket.socket, frame: Frame, fds: list[int]) -> None:
    data = frame.header() + frame.payload
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def _read_responses(sock: socket.socket) -> tuple[list[tuple[int, bytes]], str | None]:
    sock.settimeout(5)
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    data = b"".join(chunks)
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + FRAME.size > len(data):
            return out, f"a response ends inside its header ({len(data) - pos} bytes)"
        status, nfds, _reserved, length = FRAME.unpack_from(data, pos)
        pos += FRAME.size
        if pos + length > len(data):
            return out, f"a response announces {length} bytes, {len(data) - pos} follow"
        if nfds:
            return out, f"a response carries {nfds} fds"
        out.append((status, data[pos : pos + length]))
        pos += length
    return out, None


def _fd_name(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


def run_session(session: Session, timeout: float = 0.3) -> Outcome:
    """Feed ``session`` to a Receiver over a socketpair; everything is closed on return."""
    before = open_fds()
    factory = FdFactory(session.seed)
    made = [[factory.make(kind) for kind in frame.fds] for frame in session.frames]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = ReceiveOptions(overrides={"serial": "none"}, timeout=timeout, state_timeout=timeout)
    receiver = Receiver(Channel(theirs, timeout), options)
    box: dict[str, Any] = {}

    def serve() -> None:
        try:
            box["machine"] = receiver.run()
        except BaseException as e:  # recorded: run() must never raise
            box["escaped"] = e
        finally:
            receiver.channel.close()

    t0 = time.monotonic()
    thread = threading.Thread(target=serve, name="fuzz-receiver", daemon=True)
    thread.start()
    sent = 0
    ours.settimeout(5)
    try:
        for frame, fds in zip(session.frames, made, strict=True):
            send_frame(ours, frame, fds)
            sent += 1
    except OSError:
        pass  # the receiver hung up: the rest is never read
    finally:
        for fds in made:
            for fd in fds:
                os.close(fd)
    if session.ending == "eof":
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_WR)
    thread.join(timeout * (len(session.frames) + 4) + PATIENCE)
    hung = thread.is_alive()
    seconds = time.monotonic() - t0
    responses, malformed = ([], None) if hung else _read_responses(ours)
    ours.close()
    machine = box.get("machine")
    if machine is not None:
        machine.close()
    escaped = box.get("escaped")
    if escaped is not None:
        _salvage(receiver)
    words = factory.baton_words()
    factory.close()
    leaked = sorted(open_fds() - before)
    names = [_fd_name(fd) for fd in leaked]
    if not hung:
        for fd in leaked:  # so that one leak does not spoil every later example
            with contextlib.suppress(OSError):
                os.close(fd)
    return Outcome(
        session=session,
        state=receiver.state,
        error=receiver.error,
        escaped=escaped,
        hung=hung,
        sent=sent,
        responses=responses,
        malformed_response=malformed,
        leaked_fds=names,
        baton_words=words,
        committed_machine=machine is not None,
        seconds=seconds,
    )


def _salvage(receiver: Receiver) -> None:
    """After run() raised, close what the receiver still holds (the test reports it)."""
    if receiver.machine is not None:
        with contextlib.suppress(Exception):
            receiver.machine.close()
        receiver.machine = None
    for m in receiver.memory:
        with contextlib.suppress(OSError):
            os.close(m.fd)
    receiver.memory.clear()
    if receiver.baton is not None:
        with contextlib.suppress(OSError):
            receiver.baton.close()
        receiver.baton = None


# --- the rules ----------------------------------------------------------------------------------


def answered_frames(outcome: Outcome) -> int:
    """How many frames the receiver could read as the sender meant them: the well-formed
    frames written completely, up to the first that lies about its length or fds."""
    n = 0
    for frame in outcome.session.frames[: outcome.sent]:
        if not frame.well_formed:
            break
        n += 1
    return n


def violations(outcome: Outcome) -> list[tuple[str, str]]:
    """(rule, detail) for every rule the outcome breaks."""
    out: list[tuple[str, str]] = []
    if outcome.hung:
        out.append(("hang", f"run() did not return within its timeouts ({outcome.seconds:.1f} s)"))
        return out
    if outcome.escaped is not None:
        e = outcome.escaped
        out.append(("raised", f"run() raised {type(e).__name__}: {e}"))
    final = (ReceiveState.FAILED, ReceiveState.ABANDONED, ReceiveState.COMMITTED)
    if outcome.state not in final:
        out.append(("state", f"run() returned in state {outcome.state.value}"))
    if (outcome.state is ReceiveState.COMMITTED) != outcome.committed_machine:
        out.append(
            ("state", f"state {outcome.state.value} but machine={outcome.committed_machine}")
        )
    if outcome.malformed_response:
        out.append(("response", outcome.malformed_response))
    statuses = [s for s, _ in outcome.responses]
    for status, payload in outcome.responses:
        try:
            body = json.loads(payload) if payload else {}
        except ValueError:
            body = None
        if status not in (Status.OK, Status.ERROR) or not isinstance(body, dict):
            out.append(("response", f"response status {status} payload {payload[:80]!r}"))
        elif status == Status.ERROR and not isinstance(body.get("error"), str):
            out.append(("response", f"error response without a reason: {payload[:80]!r}"))
    if Status.ERROR in statuses[:-1]:
        out.append(("response", "the receiver went on after an error response"))
    if outcome.state is ReceiveState.FAILED and (not statuses or statuses[-1] != Status.ERROR):
        n = len(statuses)
        if n < answered_frames(outcome):
            frame = outcome.session.frames[n]
            out.append(
                ("no-reply", f"refused {frame.describe()} without an error reply: {outcome.error}")
            )
    if outcome.leaked_fds:
        out.append(("fd-leak", f"fds left open: {outcome.leaked_fds}"))
    if outcome.state is not ReceiveState.COMMITTED:
        for kind, word in outcome.baton_words:
            if kind != "baton-committed" and word == Baton.COMMITTED:
                out.append(
                    ("baton", f"the baton says COMMITTED but the receiver is {outcome.state.value}")
                )
    return out


@dataclass(frozen=True)
class KnownBug:
    """A rule broken in a way a strict-xfail test in test_fuzz.py pins down; tolerated by the
    fuzz tests (unless STRICT) so they keep looking for new ones."""

    name: str
    rule: str
    matches: Callable[[Outcome, str], bool]


def _error_matches(pattern: str) -> Callable[[Outcome, str], bool]:
    return lambda outcome, _detail: bool(re.search(pattern, outcome.error or ""))


def _last_answered_is(kind: Command) -> Callable[[Outcome, str], bool]:
    def check(outcome: Outcome, _detail: str) -> bool:
        n = len(outcome.responses)
        frames = outcome.session.frames
        return n < len(frames) and frames[n].kind == kind

    return check


def _both(*checks: Callable[[Outcome, str], bool]) -> Callable[[Outcome, str], bool]:
    return lambda outcome, detail: all(c(outcome, detail) for c in checks)


#: How the receiver words a payload it cannot read as a JSON object (json's RecursionError on
#: deep nesting, and int()'s ValueError on a number of over 4300 digits, escape Message.json
#: and become an "internal error").
NOT_JSON = (
    r"^(message payload is not (JSON|a JSON object)"
    r"|internal error: (maximum recursion|Exceeds the limit))"
)


KNOWN_BUGS: tuple[KnownBug, ...] = (
    # A payload that is not a JSON object ends the hand-off without an error reply.
    KnownBug("payload-not-json", "no-reply", _error_matches(NOT_JSON)),
    # ... and, in MEMORY_FD, leaks the memory fd (popped before the payload is parsed).
    KnownBug(
        "memory-fd-leak-on-bad-payload",
        "fd-leak",
        _both(_error_matches(NOT_JSON), _last_answered_is(Command.MEMORY_FD)),
    ),
    # START {"version": [..]}: `version in frozenset` raises TypeError.
    KnownBug(
        "start-version-unhashable", "no-reply", _error_matches(r"^internal error: unhashable")
    ),
    # A raw kernel-struct component of the wrong size: ValueError from from_bytes().
    KnownBug(
        "raw-size-unchecked", "no-reply", _error_matches(r"^internal error: \w+ needs \d+ bytes")
    ),
    # A vmm/run-state component that is not JSON: parsed after the import, outside the
    # handler's try: StateFormatError escapes _on_state without an error reply.
    KnownBug(
        "run-state-unchecked",
        "no-reply",
        _both(_error_matches(r"^component 'vmm/run-state'"), _last_answered_is(Command.STATE)),
    ),
    # A vcpu/NAME/... component whose NAME is not a number: ValueError from int().
    KnownBug(
        "vcpu-name-unchecked", "no-reply", _error_matches(r"^internal error: invalid literal")
    ),
    # The state's config component with a field of the wrong type: MachineConfigError
    # escapes _on_state (it catches StateFormatError and StateImportError only).
    KnownBug(
        "config-error-type",
        "no-reply",
        _both(
            _error_matches(
                r"^(config: |config field|--vcpus must|unknown SEV mode|--platform must)"
            ),
            _last_answered_is(Command.STATE),
        ),
    ),
)


def unexplained(outcome: Outcome) -> list[tuple[str, str]]:
    """The violations no known bug explains (all of them when STRICT)."""
    found = violations(outcome)
    if STRICT:
        return found
    return [
        (rule, detail)
        for rule, detail in found
        if not any(b.rule == rule and b.matches(outcome, detail) for b in KNOWN_BUGS)
    ]


def explained_by(outcome: Outcome) -> list[str]:
    return sorted(
        {
            b.name
            for rule, detail in violations(outcome)
            for b in KNOWN_BUGS
            if b.rule == rule and b.matches(outcome, detail)
        }
    )
