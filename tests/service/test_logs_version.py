"""The version (``--version``, ``query-version``, the hand-off's START), the global options
before or after the subcommand, and the log's forms (text, journald prefixes, JSON)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from intrahost import version as version_module
from intrahost.migration import protocol
from intrahost.migration.protocol import Baton, Channel, Command
from intrahost.migration.receiver import ReceiveOptions, Receiver
from intrahost.service import logs
from intrahost.service.api import ApiServer
from intrahost.service.qmp_client import QmpClient


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=(os.environ | env) if env else None,
        stdin=subprocess.DEVNULL,
    )


# --- the version -------------------------------------------------------------------------------


def test_version_option_prints_the_release() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"intrahost {version_module.version()}"
    assert version_module.version().count(".") == 2


def test_query_version_has_qmps_shape(tmp_path: Path) -> None:
    major, minor, micro = version_module.version_numbers()
    with ApiServer(tmp_path / "api.sock"), QmpClient(tmp_path / "api.sock") as qmp:
        assert qmp.execute("query-version") == {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"intrahost {version_module.version()}",
        }


def test_start_carries_the_release_and_both_sides_log_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """START's ``release`` (new) is informational: the receiver logs it and answers with its
    own; a START without it (an older sender) is accepted as before."""
    for body in (
        {"version": protocol.PROTOCOL_VERSION, "release": "0.0.9", "future": [1]},
        {"version": protocol.PROTOCOL_VERSION},
    ):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        source = Channel(a, timeout=10)
        receiver = Receiver(Channel(b, timeout=5), ReceiveOptions(timeout=5))
        thread = threading.Thread(target=receiver.run)
        baton = Baton.create()
        with caplog.at_level(logging.INFO, logger="intrahost.migration.receiver"):
            thread.start()
            reply = source.request(Command.START, protocol.to_json(body), [baton.fd])
            source.request(Command.ABANDON)
            thread.join(10)
        source.close()
        baton.close()
        assert reply["version"] == protocol.PROTOCOL_VERSION
        assert reply["release"] == version_module.version()
        line = [r.getMessage() for r in caplog.records if "hand-off from" in r.getMessage()][-1]
        assert f"to intrahost {version_module.version()}" in line
        if "release" in body:
            assert "from intrahost 0.0.9" in line
        else:
            assert "does not report its version" in line


# --- global options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--log-level", "debug", "status", "--api-socket", "{sock}"),
        ("status", "--log-level", "debug", "--api-socket", "{sock}"),
        ("status", "--api-socket", "{sock}", "--log-format", "json", "--log-level", "DEBUG"),
    ],
)
def test_global_options_before_or_after_the_subcommand(tmp_path: Path, args: tuple[str]) -> None:
    sock = str(tmp_path / "none.sock")
    result = cli(*(a.format(sock=sock) for a in args))
    # The option was taken (no usage error); the command then fails as it should.
    assert result.returncode == 1, result.stderr
    assert "no control socket" in result.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("status", "--log-level", "bogus", "--api-socket", "x"), "invalid choice: 'bogus'"),
        (("--log-level", "loud", "status", "--api-socket", "x"), "invalid choice: 'loud'"),
        (("--log-format", "xml", "status", "--api-socket", "x"), "invalid choice: 'xml'"),
        (("run", "--incoming", "unix:x", "--incoming-timeout", "soon"), "not a number"),
    ],
)
def test_a_bad_global_value_is_one_line_and_status_2(args: tuple[str], text: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_incoming_timeout_is_documented() -> None:
    assert "--incoming-timeout" in cli("run", "--help").stdout


# --- log forms ---------------------------------------------------------------------------------


def _log_through(form: str, stream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("info", form, stream)
        log = logging.getLogger("intrahost.test")
        log.debug("hidden")
        log.info("hello %s", "world", extra={"guest": "counter"})
        log.error("bad\nsecond line")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    _log_through("json", out, monkeypatch)
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["level"] for e in entries] == ["info", "error"]
    first = entries[0]
    assert first["message"] == "hello world" and first["logger"] == "intrahost.test"
    assert first["pid"] == os.getpid() and first["guest"] == "counter"
    assert first["time"].endswith("+00:00")
    assert entries[1]["message"] == "bad\nsecond line"


def test_journal_prefixes_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        _log_through("text", stream, monkeypatch)
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines == [
        "<6>intrahost.test: hello world",
        "<3>intrahost.test: bad",
        "<3>second line",
    ]
    # A stream other than the one JOURNAL_STREAM names: the ordinary form, with the time.
    other = io.StringIO()
    _log_through("text", other, monkeypatch)
    assert "intrahost[" in other.getvalue() and "<6>" not in other.getvalue()


def test_priorities() -> None:
    assert [logs.syslog_priority(n) for n in (10, 20, 25, 30, 40, 50)] == [7, 6, 6, 4, 3, 2]
