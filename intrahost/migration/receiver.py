"""The destination side of a hand-off: an explicit state machine.

States and the one message each accepts (ABANDON is accepted in every state)::

    ESTABLISHED --START(+baton fd)--> STARTED   (the protocol version chosen, or refused)
    STARTED --MEMORY_FD(+memory fd)--> MEMORY
    MEMORY --MEMORY_FD--> MEMORY            (one per memory fd)
    MEMORY --CONFIG--> CONFIGURED           (validated against this VMM's own flags)
    CONFIGURED --SEV_CONTEXT(+VM fd)--> CONFIGURED   (SEV guests: the source's VM)
    CONFIGURED --CONSOLE_FD(+pty fd)--> CONFIGURED   (a pty console's master: kept if this
                                                      VMM's console is a pty too)
    CONFIGURED --DEVICE_FDS(+fds)--> CONFIGURED      (one per virtio device: a disk's open
                                             image or a net's tap, its irqfd and ioeventfd
                                             eventfds)
    CONFIGURED --READY--> READY             (VM, slots, vCPUs, devices built; guest still runs
                                             on the source)
    READY --STATE_COMMIT--> COMMITTED       (the source paused; the state imported here,
                                             then as on COMMIT below; only when both sides
                                             named COMMIT_WITH_STATE in START and its reply)
    READY --STATE--> IMPORTED               (the source paused; state imported here)
    READY --MEMORY_DATA--> READY            (copy mode only: guest memory through the socket)
    IMPORTED --COMMIT--> COMMITTED          (baton swapped to COMMITTED; for SEV the context
                                             moved in (MOVE); the devices' irqfds assigned;
                                             then the vCPUs released)

Devices. The machine is built at READY on the fds DEVICE_FDS brought (no image is opened by
name: the path may name another file by now) and registers its ioeventfds on the source's
eventfds then; its I/O threads stay drained, so this side reads no eventfd and touches no
queue until it runs the guest. The irqfds are assigned after the commit point: the source
deassigned them in the pause (one irqfd per eventfd on the host), and the interrupt
controllers were restored at STATE (a pending interrupt injected before that restore would be
overwritten); a completion signalled in between stays in its eventfd and is injected then.
On resume each device looks at every queue once, even if its eventfd reads 0 (a kick the
source consumed but did not act on). A failed hand-off closes this side's copies of the fds,
which leaves the source's untouched.

READY builds everything before the pause. With STATE_COMMIT, the source also sends its vCPUs'
CPUID with READY: when it is this VMM's own table, each vCPU thread runs its vCPU once on a
stub outside guest memory before parking (:class:`intrahost.vmm.vcpu.RunStub`), so that the
first KVM_RUN after the import — slow on a never-run vCPU — is not in the blackout.

SEV guests: MOVE is the point of no return for the context (the source VM is dead after it).
It runs after the baton swap, when everything that can fail was validated: the state is
imported, the VM and its vCPUs are built. If MOVE itself fails (the kernel refuses it: EBUSY,
EINVAL, ...), nothing moved: this side hands the guest back (baton COMMITTED -> ABANDONED) and
the source resumes. After a successful MOVE this side only releases its vCPUs and answers;
nothing there can fail short of this process dying (docs/migration.md).

On STATE_COMMIT the commit needs nothing more from the source: import, swap, resume, answer.
In the two-step sequence, if the source goes silent (EOF, timeout) *after* the state was
imported, the destination tries to commit on its own (see :meth:`Receiver._take_over`): the
baton decides between it and a source that gives up, so a source killed at that point loses
no guest.

Anything else — another message, a timeout, EOF, a malformed payload, a state that does not
import — ends the hand-off here: the destination discards its VM (memory fds are closed,
nothing is written to guest memory before the commit, except the import into its own VM)
and makes sure the baton cannot later say COMMITTED, so the source resumes the guest.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from intrahost.errors import IntrahostError
from intrahost.kvm import Kvm
from intrahost.migration import protocol
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.migration.protocol import (
    Baton,
    Channel,
    Command,
    Message,
    NoCommonVersion,
    PayloadError,
    ProtocolError,
)
from intrahost.migration.state import (
    StateFormatError,
    StateImportError,
    config_of,
    decode_state,
    restore_machine,
    warm_up_import,
)
from intrahost.version import version as this_version
from intrahost.vmm.config import config_flags
from intrahost.vmm.devices.console import PtyConsole
from intrahost.vmm.devices.virtio.tap import tap_fd_problem
from intrahost.vmm.machine import Machine, MachineConfig, MachineConfigError, device_fd_names
from intrahost.vmm.memory import GuestMemory, MemoryConfigError
from intrahost.vmm.vcpu import RunStub

log = logging.getLogger(__name__)


class ReceiveState(enum.Enum):
    ESTABLISHED = "established"
    STARTED = "started"
    MEMORY = "memory-received"
    CONFIGURED = "configured"
    READY = "ready"
    IMPORTED = "imported"
    COMMITTED = "committed"
    ABANDONED = "abandoned"
    FAILED = "failed"


class HandoffRefused(IntrahostError):
    """The destination refuses this hand-off (the reason names what differs)."""


@dataclass
class ReceiveOptions:
    """What the new VMM was started with. ``overrides`` holds only the flags the user gave
    explicitly; guest-visible ones must equal the source's."""

    overrides: dict[str, Any] = field(default_factory=dict)
    timeout: float = protocol.DEFAULT_TIMEOUT
    #: How long to wait between READY and STATE (the source may take a while to pause).
    state_timeout: float = 6 * protocol.DEFAULT_TIMEOUT
    #: Before the pause, map into this process every guest page already in memory, so the
    #: guest's first touches after the resume do not fault (costs time before the pause).
    prefault: bool = False


@dataclass
class _Memory:
    fd: int
    size: int
    path: str | None


def _hex_bytes(value: object) -> bytes | None:
    """``value`` as the bytes of a hex string; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


class Receiver:
    """Runs one incoming hand-off on an accepted connection. ``faults``: the fault tests'
    hooks (see :mod:`intrahost.migration.faults`); none by default."""

    def __init__(
        self,
        channel: Channel,
        options: ReceiveOptions,
        kvm: Kvm | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.channel = channel
        self.options = options
        self.kvm = kvm
        self.faults = faults
        self.state = ReceiveState.ESTABLISHED
        self.baton: Baton | None = None
        self.memory: list[_Memory] = []
        self.config: MachineConfig | None = None
        self.machine: Machine | None = None
        self.running_after_commit = True
        #: Where this side's time went (µs), for query-migrate: build_us (READY), prefault_us,
        #: import_us (the state decoded and set), resume_us (from the import to the resume).
        self.timings: dict[str, int] = {}
        self.state_bytes = 0
        self.error: str | None = None
        #: The source's release, from START (None if it did not say).
        self.peer_release: str | None = None
        self._aborted = False
        #: The copy-based baseline: memory arrives as MEMORY_DATA, not as a shared fd.
        self.copy_memory = False
        self._copy_target: GuestMemory | None = None
        self._imported_ns = 0
        #: SEV: the source VM's fd, named in MOVE.
        self.sev_source_fd = -1
        #: The source's pty console (master fd, slave path), adopted when this VMM's console
        #: is a pty too.
        self.console: tuple[int, str] | None = None
        #: The protocol version chosen at START (the newest both sides speak).
        self.protocol_version = 0
        #: Each virtio device's host fds by name, by device index (DEVICE_FDS).
        self.device_fds: dict[int, dict[str, int]] = {}
        #: Both sides named COMMIT_WITH_STATE: STATE_COMMIT is accepted (and STATE is not).
        self.one_step = False
        #: The CONFIG's configuration as the source writes it into the state (its JSON),
        #: once READY found it guest-identical to the built machine's: a state whose
        #: ``config`` is these bytes needs no parsing or comparing in the blackout.
        self._checked_config: bytes | None = None
        self._source_config: MachineConfig | None = None

    # --- driver --------------------------------------------------------------------------------

    def abort(self) -> None:
        """Give this hand-off up, from another thread or a signal handler (this VMM is told
        to stop). The channel is shut down, so the wait for the source's next message ends
        and the hand-off fails as on EOF, with one difference: a receiver that has imported
        the state does not then take the guest on its own (:meth:`_take_over`); it marks the
        baton ABANDONED and the source resumes the guest. Past the commit point (the baton
        says COMMITTED) nothing changes: this VMM has the guest."""
        self._aborted = True
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> Machine | None:
        """Serve the hand-off; the running (or paused) machine on commit, else None."""
        try:
            while self.state not in (
                ReceiveState.COMMITTED,
                ReceiveState.ABANDONED,
                ReceiveState.FAILED,
            ):
                timeout = (
                    self.options.state_timeout
                    if self.state is ReceiveState.READY
                    else self.options.timeout
                )
                msg = self.channel.receive(timeout)
                self._dispatch(msg)
        except ProtocolError as e:
            if self._aborted:
                self._fail("this VMM was told to stop")
            elif self.state is ReceiveState.IMPORTED:
                self._take_over(str(e))
            else:
                self._fail(str(e))
        except IntrahostError as e:  # a refusal, a bad or unimportable state, ...
            self._fail(str(e))
        except Exception as e:  # never leave a half-built VM behind
            log.exception("incoming hand-off failed")
            self._fail(f"internal error: {e}")
        if self.state is ReceiveState.COMMITTED:
            machine, self.machine = self.machine, None
            self._release_fds()
            return machine
        return None

    _EXPECTED = {
        ReceiveState.ESTABLISHED: {Command.START},
        ReceiveState.STARTED: {Command.MEMORY_FD, Command.CONFIG},
        ReceiveState.MEMORY: {Command.MEMORY_FD, Command.CONFIG},
        ReceiveState.CONFIGURED: {
            Command.READY,
            Command.SEV_CONTEXT,
            Command.CONSOLE_FD,
            Command.DEVICE_FDS,
        },
        ReceiveState.READY: {Command.STATE, Command.STATE_COMMIT, Command.MEMORY_DATA},
        ReceiveState.IMPORTED: {Command.COMMIT},
    }

    #: Fault points named otherwise than after their command.
    _POINTS = {Command.MEMORY_FD: "recv-memory", Command.STATE_COMMIT: "recv-state"}

    def _dispatch(self, msg: Message) -> None:
        try:
            command = Command(msg.kind)
        except ValueError:
            msg.close_fds()
            self._refuse(f"unknown command {msg.kind} in state {self.state.value}")
        if command is Command.ABANDON:
            msg.close_fds()
            self.state = ReceiveState.ABANDONED
            self._discard()
            self.channel.ok()
            return
        if command not in self._EXPECTED.get(self.state, set()):
            msg.close_fds()
            self._refuse(f"can't handle {command.name} in receive state {self.state.value}")
        fds_expected = (
            1
            if command
            in (Command.START, Command.MEMORY_FD, Command.SEV_CONTEXT, Command.CONSOLE_FD)
            else 0
        )
        if command is Command.DEVICE_FDS:
            fds_expected = max(1, len(msg.fds))  # the payload names them; checked there
        if len(msg.fds) != fds_expected:
            msg.close_fds()
            self._refuse(f"{command.name} must carry {fds_expected} fd(s), got {len(msg.fds)}")
        handler = getattr(self, f"_on_{command.name.lower()}")
        log.debug("hand-off: %s in state %s", command.name, self.state.value)
        name = command.name.lower().replace("_", "-")
        point = self._POINTS.get(command, f"recv-{name}")
        self.faults.hit("destination", point, self.channel.close)
        try:
            handler(msg)
        except PayloadError as e:
            msg.close_fds()
            self._refuse(f"{command.name}: {e}")

    def _refuse(self, reason: str) -> NoReturn:
        with contextlib.suppress(ProtocolError):
            self.channel.error(reason)
        raise HandoffRefused(reason)

    # --- handlers ------------------------------------------------------------------------------

    def _on_start(self, msg: Message) -> None:
        body = msg.json()
        self.baton = Baton.adopt(msg.fds.pop())
        offer = protocol.offered(body)
        try:
            self.protocol_version = protocol.choose(offer)
        except NoCommonVersion as e:
            self._refuse(str(e))
        self.copy_memory = bool(body.get("copy_memory", False))
        release = body.get("release")
        self.peer_release = release if isinstance(release, str) else None
        features = body.get("features")
        offered = isinstance(features, list) and protocol.COMMIT_WITH_STATE in features
        self.one_step = offered and not self.faults.two_step_commit()
        log.info(
            "hand-off: protocol version %d (the source speaks %s)%s",
            self.protocol_version,
            offer,
            ", committing with the state" if self.one_step else "",
        )
        log.info(
            "hand-off from %s to intrahost %s",
            protocol.release_name(release),
            this_version(),
        )
        self.state = ReceiveState.STARTED
        reply_features = [protocol.CONSOLE_FD_FEATURE, protocol.DEVICE_FDS_FEATURE]
        if self.one_step:
            reply_features.append(protocol.COMMIT_WITH_STATE)
        self.channel.ok(
            {
                "version": self.protocol_version,
                "release": this_version(),
                "features": reply_features,
            }
        )

    def _on_memory_fd(self, msg: Message) -> None:
        body = msg.json()
        fd = msg.fds.pop()
        size = body.get("size")
        path = body.get("path")
        st = os.fstat(fd)
        if not isinstance(size, int) or size <= 0 or st.st_size < size:
            os.close(fd)
            self._refuse(f"memory fd of {st.st_size} bytes does not hold the announced {size}")
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._refuse("guest memory is not backed by a memfd or file: nothing to share")
        self.memory.append(_Memory(fd, size, path if isinstance(path, str) else None))
        self.state = ReceiveState.MEMORY
        self.channel.ok()

    def _on_config(self, msg: Message) -> None:
        try:
            source = MachineConfig.from_dict(msg.json())
        except (MachineConfigError, TypeError) as e:
            self._refuse(f"bad configuration: {e}")
        local = self.options.overrides
        visible = MachineConfig.GUEST_VISIBLE
        differing = [f for f in visible if f in local and source.flag_differs(f, local[f])]
        if differing:
            names = dict(config_flags())
            self._refuse(
                "the new VMM's flags change what the guest sees: "
                + ", ".join(names[f][0].name for f in differing)
                + " must match the running guest"
            )
        if "memory_path" in local and not self.copy_memory:
            sent = self.memory[0].path if self.memory else None
            wanted = local["memory_path"]
            if sent is None or os.path.abspath(wanted) != os.path.abspath(sent):
                self._refuse(
                    f"--memory-path {wanted} can't change across a hand-off: the guest's "
                    f"memory is {sent or 'a memfd'}"
                )
        if self.copy_memory:
            if self.memory:
                self._refuse("copy mode takes no memory fds")
        elif not self.memory:
            self._refuse("no memory fd was sent: the guest's memory is not fd-backed")
        elif len(self.memory) != 1 or self.memory[0].size != source.memory:
            self._refuse(
                f"memory layout differs: {source.memory} bytes announced, "
                f"{sum(m.size for m in self.memory)} received"
            )
        merged = source.to_dict() | {
            k: v for k, v in local.items() if k not in MachineConfig.GUEST_VISIBLE
        }
        merged["memory_path"] = None if self.copy_memory else self.memory[0].path
        self.config = MachineConfig.from_dict(merged)
        self._source_config = source
        self.state = ReceiveState.CONFIGURED
        self.channel.ok()

    def _on_sev_context(self, msg: Message) -> None:
        assert self.config is not None
        fd = msg.fds.pop()
        if not self.config.sev:
            os.close(fd)
            self._refuse("SEV_CONTEXT for a guest that is not SEV")
        if self.sev_source_fd >= 0:
            os.close(fd)
            self._refuse("a second SEV_CONTEXT")
        self.sev_source_fd = fd
        self.channel.ok()

    def _on_console_fd(self, msg: Message) -> None:
        assert self.config is not None
        body = msg.json()
        fd = msg.fds.pop()
        path = body.get("path")
        if body.get("kind") != "pty" or not isinstance(path, str) or self.console is not None:
            os.close(fd)
            self._refuse("CONSOLE_FD must carry one pty master with its path")
        if self.config.serial == "pty":
            self.console = (fd, path)
        else:
            os.close(fd)  # this VMM's console is another one (--serial)
        self.channel.ok()

    def _on_device_fds(self, msg: Message) -> None:
        assert self.config is not None
        body = msg.json()
        n, names = body.get("device"), body.get("names")
        disks = self.config.disks
        count = self.config.virtio_count
        problem = None
        if type(n) is not int or not 0 <= n < count:
            nets = f" and {len(self.config.nets)} net(s)" if self.config.nets else ""
            problem = f"device {n!r} is not one of the guest's {len(disks)} disk(s){nets}"
        elif n in self.device_fds:
            problem = f"a second DEVICE_FDS for device {n}"
        elif not isinstance(names, list) or sorted(names) != sorted(
            wanted := device_fd_names(self.config, n)
        ):
            problem = f"device {n} must carry the fds {list(wanted)}, got {names!r}"
        elif len(msg.fds) != len(names):
            problem = f"device {n}: {len(names)} fds named, {len(msg.fds)} sent"
        else:
            fds = dict(zip(names, msg.fds, strict=True))
            problem = _device_fd_problem(fds, disks[n].size if n < len(disks) else None)
        if problem is not None:
            msg.close_fds()
            self._refuse(f"DEVICE_FDS: {problem}")
        assert isinstance(n, int)
        self.device_fds[n] = fds
        msg.fds.clear()
        self.channel.ok()

    def _on_ready(self, msg: Message) -> None:
        assert self.config is not None
        if self.config.sev and self.sev_source_fd < 0:
            self._refuse("an SEV guest needs SEV_CONTEXT (the source VM) before READY")
        if len(self.device_fds) != self.config.virtio_count:
            self._refuse(
                f"the guest has {self.config.virtio_count} virtio device(s) and the source "
                f"passed the fds of {len(self.device_fds)} (DEVICE_FDS): this VMM takes a "
                "guest's disks and taps over only as the source's open fds, never by their paths "
                "or names"
            )
        cpuid = msg.json().get("cpuid") if self.one_step else None
        t0 = time.monotonic_ns()
        try:
            if self.copy_memory:
                memory = GuestMemory.create(self.config.memory)
                self._copy_target = memory
            else:
                mem = self.memory[0]
                memory = GuestMemory(os.dup(mem.fd), mem.size, mem.path)
        except (MemoryConfigError, OSError) as e:
            self._refuse(f"cannot map the guest memory: {e}")
        console = None
        if self.console is not None:
            console = PtyConsole(*self.console)
            self.console = None
        inherited = [self.device_fds[i] for i in range(self.config.virtio_count)]
        self.device_fds = {}  # the machine owns them now (and closes them if it fails)
        try:
            self.machine = Machine(
                self.config,
                memory,
                self.kvm,
                incoming=True,
                inherited_fds=inherited,
                console=console,
            )
        except IntrahostError as e:
            memory.close()
            self._refuse(f"cannot build the same machine here: {e}")
        if self.options.prefault and not self.copy_memory:
            t_fault = time.monotonic_ns()
            populated = memory.populate(memory.resident_ranges())
            self.timings["prefault_us"] = (time.monotonic_ns() - t_fault) // 1000
            log.info("prefaulted %d MiB in %d µs", populated >> 20, self.timings["prefault_us"])
        self._start_parked(self.machine, cpuid)
        warm_up_import(self.machine)
        source = self._source_config
        if source is not None and not source.guest_differences(self.machine.config):
            self._checked_config = source.to_json()
        self.timings["build_us"] = (time.monotonic_ns() - t0) // 1000
        self.state = ReceiveState.READY
        self.channel.ok(self.timings)

    def _start_parked(self, machine: Machine, cpuid: object) -> None:
        """Start the vCPU threads parked; each first runs its vCPU once on a stub when the
        source sent its CPUID (set first: KVM accepts no other table after a vCPU ran). SEV
        guests, whose KVM_RUN the platform wraps, are not pre-run."""
        table = _hex_bytes(cpuid)
        if table is None or machine.confidential is not None:
            machine.start(paused=True)
            return
        if table != machine.cpuid:
            try:
                machine.adopt_cpuid(table)
            except StateImportError as e:
                self._refuse(f"cannot take the source's CPUID: {e}")
        t0 = time.monotonic_ns()
        with RunStub(machine.vm) as stub:
            machine.start(paused=True, first_run=stub.run)
        self.timings["prerun_us"] = (time.monotonic_ns() - t0) // 1000

    def _on_memory_data(self, msg: Message) -> None:
        if self._copy_target is None:
            self._refuse("MEMORY_DATA outside copy mode: this hand-off shares the memory fd")
        payload = msg.payload
        if len(payload) < 8:
            self._refuse("MEMORY_DATA without an offset")
        (offset,) = struct.unpack_from("<Q", payload)
        data = memoryview(payload)[8:]
        if offset + len(data) > self._copy_target.size:
            self._refuse(f"MEMORY_DATA at {offset:#x}+{len(data):#x} is beyond guest memory")
        self._copy_target.buffer[offset : offset + len(data)] = data
        self.channel.ok()

    def _on_state(self, msg: Message) -> None:
        if self.one_step:
            self._refuse("STATE after both sides agreed on STATE_COMMIT")
        received, imported = self._import(msg)
        self.faults.hit("destination", "after-import", self.channel.close)
        self.state = ReceiveState.IMPORTED
        self.channel.ok({"received_ns": received, "imported_ns": imported})

    def _on_state_commit(self, msg: Message) -> None:
        """Import, then commit at once: the source sent everything it had to."""
        if not self.one_step:
            self._refuse("STATE_COMMIT without COMMIT_WITH_STATE agreed in START")
        received, imported = self._import(msg)
        self.faults.hit("destination", "after-import", self.channel.close)
        self.state = ReceiveState.IMPORTED
        self._commit({"received_ns": received, "imported_ns": imported})

    def _import(self, msg: Message) -> tuple[int, int]:
        """Decode, validate and import the state; its arrival and the end of the import."""
        received = time.monotonic_ns()
        assert self.machine is not None
        try:
            state = decode_state(msg.payload)
            # The configuration READY checked (the usual case) is compared as bytes.
            checked = self._checked_config is not None and state.get("config") == (
                self._checked_config
            )
            if not checked and config_of(state).guest_differences(self.machine.config):
                raise StateImportError("the state's configuration differs from the CONFIG sent")
            run_state = (
                state.need_json("vmm/run-state") if "vmm/run-state" in state.components else None
            )
            restore_machine(self.machine, state)
        except (StateFormatError, StateImportError, MachineConfigError) as e:
            self._refuse(f"cannot import the state: {e}")
        if run_state is not None:
            self.running_after_commit = bool(run_state.get("running"))
            booted_at = run_state.get("booted_at")
            if isinstance(booted_at, int | float):  # absent from older senders
                self.machine.booted_at = float(booted_at)
        imported = time.monotonic_ns()
        self.timings["import_us"] = (imported - received) // 1000
        self.state_bytes = len(msg.payload)
        self._imported_ns = imported
        return received, imported

    def _on_commit(self, msg: Message) -> None:
        self.running_after_commit = bool(msg.json().get("running", True))
        self._commit({})

    def _commit(self, reply: dict[str, Any]) -> None:
        """The commit point, then the guest started here (:meth:`_run_here`); answers with
        ``reply`` and the time of the release. A receiver told to stop refuses before the
        swap, so the source keeps the guest."""
        assert self.machine is not None and self.baton is not None
        if self._aborted:
            self._refuse("the destination VMM is stopping")
        # The commit point: from this swap on, the guest belongs to this VMM.
        found = self.baton.swap(Baton.PENDING, Baton.COMMITTED)
        if found != Baton.PENDING:
            self._refuse("the source abandoned the hand-off before the commit")
        self.state = ReceiveState.COMMITTED
        self.faults.hit("destination", "at-commit", self.channel.close)
        if not self._run_here():
            return
        resumed = time.monotonic_ns()
        self.timings["resume_us"] = (resumed - self._imported_ns) // 1000
        try:
            self.channel.ok(reply | {"resumed_ns": resumed})
        except ProtocolError:
            log.warning("committed, but the source did not take the acknowledgement")
        self.faults.hit("destination", "after-commit", self.channel.close)

    def _run_here(self) -> bool:
        """After the commit point, in this order: SEV's MOVE; the devices' irqfds assigned
        (after the import restored the interrupt controllers, which would overwrite an
        interrupt injected before, and after the swap: the source let go of them); the vCPUs
        released if the guest was running (each device looks at every queue once). False if
        the MOVE failed and the guest went back to the source."""
        assert self.machine is not None
        if not self._move_context():
            return False
        self.machine.attach_interrupts()
        if self.running_after_commit:
            self.machine.resume()
        return True

    def _move_context(self) -> bool:
        """SEV: move the encryption context in (after the commit point). False if it could
        not, in which case the guest went back to the source and this hand-off is over."""
        machine = self.machine
        assert machine is not None and self.baton is not None
        if machine.confidential is None:
            return True
        try:
            self.faults.hit("destination", "before-move", self.channel.close)
            machine.confidential.move_from(machine, self.sev_source_fd)
        except IntrahostError as e:
            # Nothing moved: the source VM is intact. Hand the guest back.
            self.baton.swap(Baton.COMMITTED, Baton.ABANDONED)
            self.state = ReceiveState.FAILED
            self.error = f"MOVE failed: {e}"
            log.warning("%s; the guest stays on the source", self.error)
            with contextlib.suppress(ProtocolError):
                self.channel.error(f"MOVE failed: {e}; the guest stays on the source")
            self._discard()
            return False
        self.faults.hit("destination", "after-move", self.channel.close)
        return True

    def _take_over(self, reason: str) -> None:
        """The source went silent after this side imported the whole state: commit on its
        behalf if the baton still says PENDING. The swap decides exactly as for a COMMIT: a
        source that is alive and gives up swaps ABANDONED instead and resumes the guest, and
        whichever swap comes first wins. A source killed after the import thus loses no guest.
        """
        assert self.machine is not None and self.baton is not None
        try:
            found = self.baton.swap(Baton.PENDING, Baton.COMMITTED, self.options.timeout)
        except ProtocolError as e:
            self._fail(f"{reason}; {e}")
            return
        if found != Baton.PENDING:
            self._fail(f"{reason}; the source kept the guest")
            return
        log.warning("the source went away after the import (%s): this VMM took the guest", reason)
        self.state = ReceiveState.COMMITTED
        self._run_here()

    # --- failure -------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.state is ReceiveState.COMMITTED:
            return
        log.warning("incoming hand-off abandoned: %s", reason)
        self.error = reason
        self.state = ReceiveState.FAILED
        self._discard()

    def _discard(self) -> None:
        # Make sure the baton can never say COMMITTED for this attempt.
        if self.baton is not None:
            try:
                self.baton.swap(Baton.PENDING, Baton.ABANDONED, self.options.timeout)
            except (OSError, ProtocolError) as e:
                log.warning("could not mark the baton ABANDONED: %s", e)
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        self._release_fds()

    def _release_fds(self) -> None:
        for m in self.memory:
            os.close(m.fd)
        self.memory.clear()
        if self.baton is not None:
            self.baton.close()
            self.baton = None
        if self.sev_source_fd >= 0:
            os.close(self.sev_source_fd)
            self.sev_source_fd = -1
        if self.console is not None:
            os.close(self.console[0])
            self.console = None
        for fds in self.device_fds.values():
            for fd in fds.values():
                os.close(fd)
        self.device_fds.clear()


def _device_fd_problem(fds: dict[str, int], size: int | None) -> str | None:
    """What is wrong with a device's inherited fds (None: nothing): a disk's image must be a
    regular file or block device of the guest's disk size, a net's tap a tap (TUNGETIFF), the
    others eventfds."""
    if "tap" in fds:
        problem = tap_fd_problem(fds["tap"])
        if problem is not None:
            return problem
        return _eventfd_problem(fds, "tap")
    try:
        st = os.fstat(fds["image"])
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return "the image fd is not a regular file or block device"
        actual = os.lseek(fds["image"], 0, os.SEEK_END)
        if size is not None and actual != size:
            return f"the image holds {actual} bytes, the guest's disk {size}"
    except OSError as e:
        return f"an fd cannot be examined: {e.strerror}"
    return _eventfd_problem(fds, "image")


def _eventfd_problem(fds: dict[str, int], resource: str) -> str | None:
    """Which of ``fds`` but ``resource`` is not an eventfd (None: they all are)."""
    try:
        for name, fd in fds.items():
            if name != resource and os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
                return f"fd {name!r} is not an eventfd"
    except OSError as e:
        return f"an fd cannot be examined: {e.strerror}"
    return None
