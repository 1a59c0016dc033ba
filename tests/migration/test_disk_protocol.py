"""The receiver's side of a hand-off with disks, message by message over a socketpair: the
configuration check, DEVICE_FDS and what it refuses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_protocol import Session, start

from intrahost.migration import protocol
from intrahost.migration.protocol import Command, PeerRefused
from intrahost.migration.receiver import ReceiveOptions
from intrahost.vmm.config import parse_disks
from intrahost.vmm.machine import MachineConfig
from intrahost.vmm.memory import GuestMemory, MiB


def disk_config(image: Path, size: int = 1 * MiB, **kw: object) -> MachineConfig:
    disks = tuple(
        d.__class__(**{**d.to_dict(), "size": size}) for d in parse_disks([f"path={image}"])
    )
    return MachineConfig(memory=16 * MiB, guest="disk", disks=disks, **kw)  # type: ignore[arg-type]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 * MiB))
    return path


def configured(s: Session, config: MachineConfig) -> dict[str, object]:
    start(s)
    with GuestMemory.create(16 * MiB) as mem:
        s.source.request(Command.MEMORY_FD, protocol.to_json({"size": 16 * MiB}), [mem.fd])
    return s.source.request(Command.CONFIG, protocol.to_json(config.to_dict()))


@pytest.fixture
def session_with(request: pytest.FixtureRequest) -> Iterator[object]:
    sessions: list[Session] = []

    def make(overrides: dict[str, object]) -> Session:
        s = Session(ReceiveOptions(overrides=overrides, timeout=5))
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.finish()
        s.baton.close()


def test_the_same_disk_flags_on_the_new_vmm_are_accepted(image: Path, session_with) -> None:  # type: ignore[no-untyped-def]
    """The new VMM given the same --disk flags: the image's size is known only to the VMM
    that opened it, and the path is not used (the image fd is inherited), so only the guest's
    view of the disks (ids, read-only flags) is compared."""
    s = session_with({"disks": parse_disks([f"path={image}"])})
    configured(s, disk_config(image))
    s = session_with({"disks": parse_disks(["path=/elsewhere.img"])})
    configured(s, disk_config(image))


@pytest.mark.parametrize(
    "flags", [["path=X,readonly=on"], ["path=X,id=other"], ["path=X", "path=Y"], []]
)
def test_disk_flags_that_change_the_guest_view_are_refused(
    image: Path,
    session_with,  # type: ignore[no-untyped-def]
    flags: list[str],
) -> None:
    s = session_with({"disks": parse_disks(flags)})
    with pytest.raises(PeerRefused, match="--disk "):
        configured(s, disk_config(image))


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _device_fds(s: Session, image: Path, body: dict[str, object], fds: list[int]) -> None:
    try:
        s.source.request(Command.DEVICE_FDS, protocol.to_json(body), fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_ready_without_the_disks_fds_is_refused(image: Path, session_with) -> None:  # type: ignore[no-untyped-def]
    """A source that does not pass the open images (an older VMM) is refused: this VMM never
    opens a running guest's images by their paths."""
    s = session_with({})
    configured(s, disk_config(image))
    with pytest.raises(PeerRefused, match="never by their paths"):
        s.source.request(Command.READY)


NAMES = ["image", "irq", "notify/0"]


@pytest.mark.parametrize(
    ("body", "kinds", "message"),
    [
        ({"device": 1, "names": NAMES}, "iee", "not one of the guest's 1 disk"),
        ({"device": "0", "names": NAMES}, "iee", "not one of"),
        ({"device": 0, "names": ["image", "irq"]}, "ie", "must carry the fds"),
        ({"device": 0, "names": NAMES}, "ie", "3 fds named, 2 sent"),
        ({"device": 0, "names": NAMES}, "eee", "not a regular file"),
        ({"device": 0, "names": NAMES}, "iie", "not an eventfd"),
        ({"device": 0, "names": NAMES}, "Iee", "holds 4096 bytes"),
    ],
)
def test_bad_device_fds_are_refused(
    image: Path,
    tmp_path: Path,
    session_with,  # type: ignore[no-untyped-def]
    body: dict[str, object],
    kinds: str,
    message: str,
) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    s = session_with({})
    configured(s, disk_config(image))
    opener = {
        "i": lambda: os.open(image, os.O_RDWR),
        "I": lambda: os.open(small, os.O_RDWR),
        "e": _eventfd,
    }
    with pytest.raises(PeerRefused, match=message):
        _device_fds(s, image, body, [opener[k]() for k in kinds])


def test_a_second_device_fds_for_one_device_is_refused(image: Path, session_with) -> None:  # type: ignore[no-untyped-def]
    s = session_with({})
    configured(s, disk_config(image))
    body = {"device": 0, "names": NAMES}
    _device_fds(s, image, body, [os.open(image, os.O_RDWR), _eventfd(), _eventfd()])
    with pytest.raises(PeerRefused, match="a second DEVICE_FDS"):
        _device_fds(s, image, body, [os.open(image, os.O_RDWR), _eventfd(), _eventfd()])
