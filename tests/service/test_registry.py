"""The runtime directory of control sockets (intrahost.service.registry): where it is, which
names are valid, and how live and stale sockets are told apart."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from intrahost.service import registry
from intrahost.service.api import ApiServer


def test_the_runtime_directory_follows_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert registry.runtime_dir() == "/run/user/1000/intrahost"
    assert registry.socket_path("web1") == "/run/user/1000/intrahost/web1.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert registry.runtime_dir() == "/run/intrahost"


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(registry.RegistryError, match="invalid VMM name"):
        registry.check_name(name)


def test_good_names() -> None:
    for name in ("web1", "vm-42", "db.primary", "A_b", "x" * 64):
        assert registry.check_name(name) == name


def test_entries_tell_live_from_stale(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sockdir))
    assert registry.entries() == []  # no directory yet
    directory = Path(registry.prepare_runtime_dir())
    assert directory.stat().st_mode & 0o777 == 0o700
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "gone.sock"))
    stale.close()
    (directory / "notes.txt").write_text("not a socket")
    (directory / "file.sock").write_text("not a socket either")
    with ApiServer(directory / "live.sock"):
        found = registry.entries()
        assert [(e.name, e.state) for e in found] == [("gone", "stale"), ("live", "live")]
        info = registry.describe(found[1])
        assert info["status"] == "unreachable"  # an API server with no VMM commands
        assert registry.remove_stale(found[0]) and not (directory / "gone.sock").exists()
        assert not registry.remove_stale(found[1])
