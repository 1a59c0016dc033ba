"""The source side of a hand-off.

Phases, in order::

    connect -> START(+baton) -> MEMORY_FD(+memfd) -> CONFIG -> [SEV_CONTEXT(+VM)]
            -> [CONSOLE_FD(+pty master)] -> DEVICE_FDS(+fds) per virtio device
            -> READY(+CPUID)                                              guest still runs
                 (the protocol version agreed at START; the state is written in it)
    pause (vCPUs, then the devices drained) -> irqfds deassigned
            -> export -> STATE_COMMIT                                     the blackout
    release the VM (the destination runs the guest)

With a destination that does not name :data:`~intrahost.migration.protocol.COMMIT_WITH_STATE`
in its START reply (intrahost 0.1), STATE_COMMIT is two requests: STATE, then COMMIT.

Devices. Each virtio device's host fds (a disk's open image, its irqfd and ioeventfd
eventfds) go to the destination before the pause; it registers its ioeventfds on the same
eventfds then (a VM may share them), so a kick the guest writes at any time is counted in
the one eventfd and served by whichever VMM runs the guest afterwards. In the pause this side
drains the devices — the request each is on completes and is published in the used ring;
chains the guest made available and the device has not taken stay in the ring, and the
queue's position travels in the state, so the destination takes them (each request completes
exactly once) — and then deassigns its irqfds, which the destination assigns after the
commit point. On a failure this side assigns them again before the guest resumes: it never
gave up the image fd, the eventfds or the ioeventfd registrations.

The **commit point** is the destination's swap of the baton from PENDING to COMMITTED
(see :mod:`intrahost.migration.protocol`); the destination makes it as soon as it imported
the state of a STATE_COMMIT — it needs nothing more from this side, which may even be dead
by then — or, in the two-step sequence, on COMMIT, or on its own if this side goes silent
after the destination imported the state. Before it, any failure —
the destination dies, EOF, a timeout, a refusal, a state it can't import — makes this side
swap the baton to ABANDONED and resume the guest (if it was running; a pause that times out
has undone itself, so there is nothing to resume). If that swap finds
COMMITTED, the destination took the guest even though its acknowledgement never arrived: this
side must not resume, and reports it. Never both; never neither unless the VMM that held the
guest at that moment dies.

This side never touches guest memory (only the copy-based baseline reads it, to send it), and
it returns as soon as the destination acknowledges the commit: how the guest itself saw the
pause is for tools that know the guest (:mod:`intrahost.vmm.guests.probe`) to measure, with
the breakdown's absolute ``paused_at_ns`` and ``resumed_at_ns`` (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any

from intrahost.errors import IntrahostError
from intrahost.migration import protocol
from intrahost.migration.faults import NO_FAULTS, Faults
from intrahost.migration.protocol import Baton, Channel, Command, PeerRefused, ProtocolError
from intrahost.migration.state import save_machine, warm_up_export
from intrahost.version import version
from intrahost.vmm.devices.console import PtyConsole
from intrahost.vmm.machine import Machine
from intrahost.vmm.vcpu import PauseTimeout

log = logging.getLogger(__name__)


class MigrationFailed(IntrahostError):
    """The hand-off did not happen; the guest still runs on this VMM."""


@dataclass(frozen=True)
class Breakdown:
    """Where the blackout went, in microseconds (pause start to the destination's resume)."""

    pause_us: int
    copy_us: int
    export_us: int
    transfer_us: int
    import_us: int
    resume_us: int
    total_us: int
    state_bytes: int
    prepare_us: int
    #: The part of ``pause_us`` spent draining the virtio devices and deassigning their irqfds.
    drain_us: int = 0
    #: CLOCK_MONOTONIC (ns) when the pause began on this side and when the destination
    #: released its vCPUs: the guest's own stall across the hand-off spans the second and
    #: starts at or after the first.
    paused_at_ns: int = 0
    resumed_at_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SendOptions:
    timeout: float = protocol.DEFAULT_TIMEOUT
    #: READY makes the destination build its VM (slot registration grows with memory size).
    ready_timeout: float = 60.0
    #: The copy-based baseline: send guest memory through the socket during the pause (as a
    #: VMM without fd passing must), skipping all-zero chunks, instead of the memory fd.
    copy_memory: bool = False
    #: How long the vCPUs may take to park; past it the pause is undone and the hand-off fails.
    pause_timeout: float = 5.0


COPY_CHUNK = 8 << 20


class Sender:
    """Hands ``machine`` to the destination listening at ``url``. ``faults``: the fault
    tests' hooks (see :mod:`intrahost.migration.faults`); none by default."""

    def __init__(
        self,
        machine: Machine,
        url: str,
        options: SendOptions | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.machine = machine
        self.path = protocol.parse_url(url)
        self.options = options or SendOptions()
        self.faults = faults
        self.phase = "connect"
        self.committed = False
        #: The protocol version the destination chose at START; the state is written in it.
        self.protocol_version: int | None = None

    def _checkpoint(self, phase: str, channel: Channel | None = None) -> None:
        self.phase = phase
        self.faults.hit("source", phase, channel.close if channel is not None else None)

    def run(self) -> Breakdown:
        machine = self.machine
        if machine.status == "shutdown":
            raise MigrationFailed("the guest has shut down: there is nothing to hand off")
        if not machine.memory.is_fd_backed():
            raise MigrationFailed("guest memory is not fd-backed: it can't be handed off")
        refusal = machine.confidential.handoff_refusal() if machine.confidential else None
        if refusal is not None:
            raise MigrationFailed(refusal)
        baton = Baton.create()
        paused_here = False
        was_running = machine.status == "running"
        channel: Channel | None = None
        data = b""
        drain_us = 0
        try:
            t_prepare = time.monotonic_ns()
            channel = self._connect()
            self._checkpoint("start", channel)
            start = protocol.start_offer() | {
                "copy_memory": self.options.copy_memory,
                # Informational (logged by both sides); a receiver ignores keys it does not know.
                "release": version(),
            }
            if not self.faults.two_step_commit():
                start["features"] = [protocol.COMMIT_WITH_STATE]
            reply = channel.request(Command.START, protocol.to_json(start), [baton.fd])
            self.protocol_version = protocol.agreed(reply, protocol.spoken())
            log.info(
                "hand-off to %s: from intrahost %s to %s, protocol %d",
                self.path,
                version(),
                protocol.release_name(reply.get("release")),
                self.protocol_version,
            )
            features = reply.get("features")
            features = features if isinstance(features, list) else []
            # Only if this side named it too (a destination lists it only then).
            one_step = protocol.COMMIT_WITH_STATE in features and "features" in start
            self._checkpoint("memory", channel)
            if not self.options.copy_memory:
                channel.request(
                    Command.MEMORY_FD,
                    protocol.to_json({"size": machine.memory.size, "path": machine.memory.path}),
                    [machine.memory.fd],
                )
            self._checkpoint("config", channel)
            channel.request(Command.CONFIG, protocol.to_json(machine.config.to_dict()))
            if machine.confidential is not None:
                # The VM itself travels: the destination names it in MOVE.
                channel.request(Command.SEV_CONTEXT, fds=[machine.confidential.vm.fd])
            console = machine.uart.console
            if isinstance(console, PtyConsole) and protocol.CONSOLE_FD_FEATURE in features:
                # The guest's terminal travels: its users keep their session on it.
                channel.request(
                    Command.CONSOLE_FD,
                    protocol.to_json({"kind": "pty", "path": console.slave_path}),
                    [console.master_fd],
                )
            if machine.virtio:
                if protocol.DEVICE_FDS_FEATURE not in features:
                    raise MigrationFailed(
                        "the destination VMM cannot take virtio devices (it does not offer "
                        f"{protocol.DEVICE_FDS_FEATURE!r}: an older release); the guest keeps "
                        "running here"
                    )
                self._checkpoint("devices", channel)
                send_device_fds(channel, machine)
            self._checkpoint("ready", channel)
            # What can't change during the pause crosses before it: the vCPUs' CPUID lets
            # the destination run its vCPUs once before the pause (their first KVM_RUN is slow).
            ready = {"cpuid": machine.cpuid.hex()} if one_step else {}
            channel.request(
                Command.READY, protocol.to_json(ready), timeout=self.options.ready_timeout
            )
            warm_up_export(machine)
            prepare_us = (time.monotonic_ns() - t_prepare) // 1000

            # --- the blackout starts here ---
            self._checkpoint("before-pause", channel)
            t0 = time.monotonic_ns()
            if was_running:
                self.phase = "pause"
                machine.pause(self.options.pause_timeout)  # undone by itself if it fails
                paused_here = True
            t_detach = time.monotonic_ns()
            machine.detach_interrupts()  # the destination assigns them after the commit
            t1 = time.monotonic_ns()
            drain_us = (machine.drain_us if paused_here else 0) + (t1 - t_detach) // 1000
            self._checkpoint("after-pause", channel)
            if self.options.copy_memory:
                copy_memory(channel, machine)
            t_copied = time.monotonic_ns()
            self._checkpoint("export")
            data = save_machine(machine, was_running, self.protocol_version)
            t2 = time.monotonic_ns()
            self._checkpoint("state", channel)
            data = self.faults.state(data)
            if one_step:
                # The destination commits and resumes as soon as it imported the state.
                imported = resumed = channel.request(Command.STATE_COMMIT, data)
            else:
                imported = channel.request(Command.STATE, data)
                self._checkpoint("after-state", channel)
                self._checkpoint("commit", channel)
                resumed = channel.request(
                    Command.COMMIT, protocol.to_json({"running": was_running})
                )
            self.committed = True
            self._checkpoint("after-commit", channel)
            self.phase = "committed"
        except (ProtocolError, PeerRefused, PauseTimeout, OSError) as e:
            if isinstance(e, PeerRefused):
                e.close_fds()
            found = baton.swap(Baton.PENDING, Baton.ABANDONED)
            if found == Baton.COMMITTED:
                # The destination crossed the commit point; its acknowledgement was lost.
                self.committed = True
                self.phase = "committed"
                log.warning("hand-off committed by the destination; its ack was lost: %s", e)
                self._close(channel, baton)
                return Breakdown(0, 0, 0, 0, 0, 0, 0, 0, 0)
            self._close(channel, baton, abandon=True)
            machine.attach_interrupts()
            if paused_here:
                machine.resume()
            raise MigrationFailed(
                f"hand-off failed at {self.phase}: {e}; the guest keeps running here"
            ) from e
        except BaseException:
            baton.swap(Baton.PENDING, Baton.ABANDONED)
            self._close(channel, baton, abandon=True)
            machine.attach_interrupts()
            if paused_here:
                machine.resume()
            raise
        self._close(channel, baton)
        received = int(imported.get("received_ns", t2))
        imported_ns = int(imported.get("imported_ns", received))
        resumed_ns = int(resumed.get("resumed_ns", imported_ns))
        return Breakdown(
            pause_us=(t1 - t0) // 1000,
            copy_us=(t_copied - t1) // 1000,
            export_us=(t2 - t_copied) // 1000,
            transfer_us=max(0, received - t2) // 1000,
            import_us=max(0, imported_ns - received) // 1000,
            resume_us=max(0, resumed_ns - imported_ns) // 1000,
            total_us=max(0, resumed_ns - t0) // 1000,
            state_bytes=len(data),
            prepare_us=prepare_us,
            drain_us=drain_us,
            paused_at_ns=t0,
            resumed_at_ns=resumed_ns,
        )

    def _connect(self) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.options.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise MigrationFailed(
                f"no destination is waiting at {self.path}: start one with "
                f"'intrahost run --incoming unix:{self.path}'"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise MigrationFailed(f"nothing listens at {self.path} (a stale socket?)") from None
        except OSError as e:
            sock.close()
            raise MigrationFailed(f"cannot connect to {self.path}: {e.strerror}") from None
        return Channel(sock, self.options.timeout, self.faults)

    @staticmethod
    def _close(channel: Channel | None, baton: Baton, abandon: bool = False) -> None:
        if channel is not None:
            if abandon:
                with contextlib.suppress(ProtocolError):
                    channel.send(Command.ABANDON, timeout=1.0)
            channel.close()
        baton.close()


def send_device_fds(channel: Channel, machine: Machine) -> None:
    """DEVICE_FDS for each virtio device, in device order: its host fds, named. This side
    keeps its own (SCM_RIGHTS duplicates them), so a failed hand-off changes nothing here."""
    for n, device in enumerate(machine.virtio):
        fds = device.host_fds()
        body = {"device": n, "names": list(fds)}
        channel.request(Command.DEVICE_FDS, protocol.to_json(body), list(fds.values()))


def copy_memory(channel: Channel, machine: Machine) -> None:
    """The baseline's memory transfer: every extent of the memory file that holds data goes
    through the socket in chunks (holes are skipped without being read, as a VMM skips zero
    pages; reading them through the mapping would allocate them)."""
    mem = machine.memory.buffer
    for start, length in machine.memory.data_ranges():
        for offset in range(start, start + length, COPY_CHUNK):
            end = min(offset + COPY_CHUNK, start + length)
            channel.request(Command.MEMORY_DATA, struct.pack("<Q", offset) + mem[offset:end])
