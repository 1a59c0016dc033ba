"""The control socket path changing hands during an upgrade: the new VMM renames its socket
over the path while the old VMM closes its server and removes "its" socket file. Found by the
soak (bench/soak.py): at hand-off 538 of 1000 the old VMM checked that the path was still its
socket, the new VMM's rename came next, and the old VMM's unlink removed the new VMM's socket,
leaving the guest running behind a control socket nobody could reach. Each interleaving of
the rename with the removal is forced here; the new socket must survive every one."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from support import PATIENCE

from intrahost.service import api as api_module
from intrahost.service.api import ApiServer


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PATIENCE)  # a refused or reset connection fails at once
    try:
        s.connect(str(path))
        return b"QMP" in s.recv(4096)
    except OSError:
        return False
    finally:
        s.close()


def _close_old_while(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, hook: str
) -> tuple[Path, ApiServer]:
    """Old server at PATH, new at PATH.new; close the old one, with the new one's rename over
    PATH done from inside ``hook`` ("rename": when the old one moves PATH aside; "lstat": when
    it looks at what it moved; "before": before it starts)."""
    path = sockdir / "api.sock"
    old = ApiServer(path)
    old.start()
    new = ApiServer(sockdir / "api.sock.new")
    new.start()

    def hand_over() -> None:
        os.rename(sockdir / "api.sock.new", path)
        new.path = str(path)

    def wrap(real: Callable[..., object]) -> Callable[..., object]:
        done = False

        def call(*args: object) -> object:
            nonlocal done
            if not done:
                done = True
                if hook == "rename":
                    hand_over()  # lands just before the old server's move-aside
                    return real(*args)
                result = real(*args)
                hand_over()  # lands just after the old server looked at what it moved
                return result
            return real(*args)

        return call

    if hook == "before":
        hand_over()
    else:
        target = "rename" if hook == "rename" else "lstat"
        monkeypatch.setattr(api_module.os, target, wrap(getattr(os, target)))
    old.close()
    monkeypatch.undo()
    return path, new


@pytest.mark.parametrize("hook", ["before", "rename", "lstat"])
def test_the_new_vmms_socket_survives_the_old_ones_close(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    path, new = _close_old_while(sockdir, monkeypatch, hook)
    try:
        assert path.is_socket() and _answers(path), "the new VMM's socket was removed"
        assert not list(sockdir.glob("api.sock.closing-*")), "a moved-aside file remains"
    finally:
        new.close()
    assert not path.exists()  # the new server removes its own socket in turn


def test_an_old_server_alone_still_removes_its_socket(sockdir: Path) -> None:
    path = sockdir / "api.sock"
    with ApiServer(path):
        assert path.is_socket()
    assert not path.exists() and not list(sockdir.iterdir())


def test_the_control_socket_appears_only_once_it_listens(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sees the socket file may connect at once: the file must not exist
    before listen() (a race the test suite once hit as 'nothing listens')."""
    path = sockdir / "api.sock"
    seen: list[bool] = []
    real_listen = socket.socket.listen

    def listen(self: socket.socket, *args: int) -> None:
        seen.append(path.exists())
        real_listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", listen)
    sock, _ = api_module._bind_listener(str(path))
    try:
        assert seen == [False]
        assert path.exists()
        assert [p.name for p in sockdir.iterdir()] == ["api.sock"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
    finally:
        sock.close()
