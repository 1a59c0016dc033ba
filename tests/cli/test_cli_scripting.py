"""The command line in scripts (issue 12, §4): ``--output json`` prints exactly one JSON
document on stdout (errors too, as ``{"error": {"class", "desc"}}`` with a non-zero exit);
``intrahost query-migrate``; and no Python traceback ever reaches the user: not from a closed
pipe, not from argparse's type functions, not from an interrupt, not from a bug."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import needs_kvm


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intrahost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def json_error(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The error document of a failed ``--output json`` command (the only output)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == "", result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"error"}, document
    error: dict[str, Any] = document["error"]
    assert isinstance(error["class"], str) and error["class"]
    assert isinstance(error["desc"], str) and error["desc"]
    return error


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- a control socket that is not an intrahost VMM ---------------------------------------------


class FakeQmp:
    """A QMP server at ``path`` that greets and then answers every command with ``reply``
    (or never answers, with ``reply=None``)."""

    def __init__(self, path: Path, reply: Any) -> None:
        self.path = path
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self._stop = False
        self._conns: list[socket.socket] = []
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            buffer = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b"}" in buffer:
                    text, _, buffer = buffer.partition(b"}")
                    request = json.loads(text + b"}" * (text.count(b"{")))
                    self.requests.append(str(request.get("execute")))
                    if request.get("execute") == "qmp_capabilities":
                        answer: dict[str, Any] = {"return": {}}
                    elif self.reply is None:
                        continue
                    else:
                        answer = {"return": self.reply}
                    answer["id"] = request.get("id")
                    conn.sendall(json.dumps(answer).encode() + b"\r\n")
        except (OSError, ValueError):
            return

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self._conns:
            conn.close()


class FakeQmps:
    def __init__(self, sockdir: Path) -> None:
        self.sockdir = sockdir
        self.servers: list[FakeQmp] = []

    def __call__(self, reply: Any) -> Path:
        path = self.sockdir / f"fake{len(self.servers)}.sock"
        self.servers.append(FakeQmp(path, reply))
        return path

    @property
    def requests(self) -> list[str]:
        return [r for server in self.servers for r in server.requests]


@pytest.fixture
def fake_qmp(sockdir: Path) -> Iterator[FakeQmps]:
    servers = FakeQmps(sockdir)
    yield servers
    for server in servers.servers:
        server.close()


# --- errors as JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("query-migrate",),
        ("migrate", "unix:/nonexistent/dest.sock"),
        ("upgrade",),
    ],
    ids=["status", "query-migrate", "migrate", "upgrade"],
)
def test_errors_are_one_json_document(sockdir: Path, args: tuple[str, ...]) -> None:
    missing = str(sockdir / "none.sock")
    command, *rest = args
    error = json_error(cli(command, "--api-socket", missing, "--output", "json", *rest))
    assert "no control socket" in error["desc"] or "no VMM waits" in error["desc"], error


def test_selftest_errors_are_json(sockdir: Path) -> None:
    if Path("/dev/sev").exists():
        pytest.skip("this host has SEV: the kernel platform is available")
    error = json_error(cli("selftest", "--platform", "kernel", "--output", "json"))
    assert "/dev/sev" in error["desc"] and error["class"] == "PlatformUnavailableError"


def test_usage_errors_are_json_too(sockdir: Path) -> None:
    error = json_error(cli("status", "--output", "json"))
    assert "--api-socket" in error["desc"] and "--name" in error["desc"]
    assert error["class"] == "UsageError"


def test_a_server_that_answers_nonsense_gives_one_line(fake_qmp: FakeQmps) -> None:
    """An unexpected exception (here: a server of another kind, whose replies do not have
    the expected shape) is one line; its traceback only with --log-level debug."""
    path = fake_qmp(["not", "an", "object"])
    line = one_line(cli("status", "--api-socket", str(path)))
    assert "internal error" in line and "--log-level debug" in line
    debug = cli("--log-level", "debug", "status", "--api-socket", str(path))
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    error = json_error(cli("status", "--api-socket", str(path), "--output", "json"))
    assert error["class"] == "InternalError"


def test_an_interrupt_is_one_line(fake_qmp: FakeQmps) -> None:
    path = fake_qmp(None)  # never answers query-status
    proc = subprocess.Popen(
        [sys.executable, "-m", "intrahost", "status", "--api-socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        # Interrupt once the command waits for the answer (it has connected).
        deadline = time.monotonic() + 20
        while "query-status" not in fake_qmp.requests:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip() == "intrahost: interrupted", err


def test_argparse_type_errors_name_the_value_not_a_lambda() -> None:
    for args in (
        ("run", "--sev-policy", "zero"),
        ("run", "--allow-uid", "root"),
        ("run", "--vcpus", "two"),
    ):
        result = cli(*args)
        assert result.returncode == 2, result
        assert "<lambda>" not in result.stderr and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert args[1] in last and repr(args[2]) in last, last


def test_a_closed_pipe_is_not_a_traceback(fake_qmp: FakeQmps) -> None:
    """``intrahost status | head -c1``: the reader goes away before the output is written."""
    path = fake_qmp({"status": "running", "running": True, "big": "x" * 200_000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "intrahost", "status", "--api-socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(20)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err, err
    assert err == ""


# --- results as JSON ---------------------------------------------------------------------------


@needs_kvm
def test_status_migrate_query_migrate_upgrade_as_json(vmm_factory: Any, sockdir: Path) -> None:
    api = sockdir / "api.sock"
    vmm_factory(
        "run", "--memory", "32M", "--serial", "none", "--api-socket", str(api), wait_path=api
    )  # fmt: skip
    status = json.loads(cli("status", "--api-socket", str(api), "--output", "json").stdout)
    assert status["status"] == "running" and status["vm"]["memory"] == 32 << 20

    query = cli("query-migrate", "--api-socket", str(api), "--output", "json")
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == {"status": "none"}
    text = cli("query-migrate", "--api-socket", str(api))
    assert text.returncode == 0 and text.stdout.strip() == "migration: none", text.stdout

    upgraded = cli("upgrade", "--api-socket", str(api), "--output", "json")
    assert upgraded.returncode == 0, upgraded.stderr
    result = json.loads(upgraded.stdout)
    assert result["status"] == "completed" and result["blackout"]["total_us"] > 0
    assert isinstance(result["new-pid"], int) and result["api-socket"] == str(api)

    mig = sockdir / "mig.sock"
    api2 = sockdir / "api2.sock"
    vmm_factory(
        "run", "--incoming", f"unix:{mig}", "--serial", "none", "--api-socket", str(api2),
        name="dest", wait_path=mig,
    )  # fmt: skip
    migrated = cli("migrate", "--api-socket", str(api), f"unix:{mig}", "--output", "json")
    assert migrated.returncode == 0, migrated.stderr
    result = json.loads(migrated.stdout)
    assert result["status"] == "completed" and "blackout" in result
    after = json.loads(cli("query-migrate", "--api-socket", str(api2), "--output", "json").stdout)
    assert "status" in after
    cli("stop", "--api-socket", str(api2))
