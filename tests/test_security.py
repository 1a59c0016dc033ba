"""Security: who can reach a VMM's sockets, who may hand it a guest, and what the package
refuses to deserialise.

- The control socket and the migration socket are 0600 whatever the umask; a directory that
  others may write (and is not sticky), or that belongs to another user, is named in a
  warning; a path that is not a socket is refused, never removed.
- The destination checks the sender's credentials (SO_PEERCRED): a process of another uid is
  refused with an error message naming --allow-uid and a logged reason, while the destination
  keeps waiting; with --allow-uid it is accepted; root is not let in by a non-root VMM. The
  peers run in forked children that drop to uid 65534 (the tests run as root; the socket's
  mode is loosened on purpose so that only the credential check stands in the way).
- An allowed sender of another uid cannot name the console file the destination writes.
- The package holds no pickle, marshal or other code-bearing format, and no eval/exec.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import HAVE_KVM, PATIENCE, VmmProcess, needs_kvm, wait_for_path

import intrahost
from intrahost.migration.protocol import FRAME, Status
from intrahost.migration.receiver import ReceiveOptions
from intrahost.service import runner
from intrahost.service.api import ApiServer, check_socket_directory

NOBODY = 65534
root_only = pytest.mark.skipif(os.getuid() != 0, reason="needs root (to become uid 65534)")
#: How long a destination that must turn a peer away waits for its sender (it waits all of it,
#: so not PATIENCE): a peer in a child process connects and is refused well within it even on
#: a loaded host.
REFUSED_PEER_WAIT = 10.0

#: Directory modes, and whether others could replace a socket in it.
DIR_MODES = [
    (0o700, False),
    (0o711, False),
    (0o755, False),
    (0o1777, False),
    (0o1770, False),
    (0o720, True),
    (0o770, True),
    (0o775, True),
    (0o777, True),
]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that uid 65534 can enter (0711): for the credential tests."""
    path = Path(tempfile.mkdtemp(prefix="ih-sec-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _warnings(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(what)
    ]


# --- socket modes and directories ---------------------------------------------------------------


@pytest.mark.parametrize(("mode", "unsafe"), DIR_MODES, ids=[f"{m:04o}" for m, _ in DIR_MODES])
def test_control_socket_is_0600_and_an_unsafe_directory_is_named(
    sockdir: Path, caplog: pytest.LogCaptureFixture, mode: int, unsafe: bool
) -> None:
    d = sockdir / "d"
    d.mkdir()
    d.chmod(mode)
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        with caplog.at_level(logging.WARNING), ApiServer(d / "api.sock"):
            assert stat.S_IMODE(os.lstat(d / "api.sock").st_mode) == 0o600
    finally:
        os.umask(old)
    warnings = _warnings(caplog, "control socket")
    assert bool(warnings) == unsafe, warnings
    if unsafe:
        assert f"mode {mode:04o}" in warnings[0] and "mkdir -m 700" in warnings[0]


@pytest.mark.parametrize(("mode", "unsafe"), DIR_MODES, ids=[f"{m:04o}" for m, _ in DIR_MODES])
def test_migration_socket_is_0600_and_an_unsafe_directory_is_named(
    sockdir: Path, caplog: pytest.LogCaptureFixture, mode: int, unsafe: bool
) -> None:
    d = sockdir / "d"
    d.mkdir()
    d.chmod(mode)
    path = d / "mig.sock"
    old = os.umask(0)
    try:
        with caplog.at_level(logging.WARNING):
            listener = runner.listen(f"unix:{path}")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        listener.close()
    warnings = _warnings(caplog, "migration socket")
    assert bool(warnings) == unsafe, warnings


@root_only
def test_a_directory_of_another_user_is_named(sockdir: Path) -> None:
    d = sockdir / "theirs"
    d.mkdir()
    d.chmod(0o755)
    os.chown(d, NOBODY, NOBODY)
    warning = check_socket_directory(str(d / "api.sock"), "control socket")
    assert warning is not None and f"belongs to uid {NOBODY}" in warning


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_incoming_refuses_a_path_that_is_not_a_socket_and_leaves_it(
    sockdir: Path, kind: str
) -> None:
    path = sockdir / "mig.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        target = sockdir / "real.sock"
        runner.listen(f"unix:{target}").close()  # a stale socket: the link points at one
        path.symlink_to(target)
    with pytest.raises(runner.IncomingError, match="exists and is not a socket"):
        runner.listen(f"unix:{path}")
    assert os.path.lexists(path)
    if kind == "file":
        assert path.read_text() == "precious"


# --- the sender's credentials -------------------------------------------------------------------


def _in_child(uid: int, work: Callable[[], bytes]) -> Callable[[], tuple[int, bytes]]:
    """Fork; the child drops to ``uid`` and runs ``work``, sending back what it returns.
    The returned function waits for the child: (exit status, its bytes)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = work()
        except BaseException as e:
            out, status = f"{type(e).__name__}: {e}".encode(), 1
        os.write(w, out)
        os._exit(status)
    os.close(w)

    def wait() -> tuple[int, bytes]:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), b"".join(chunks)

    return wait


def _connect_and_read(path: Path) -> Callable[[], bytes]:
    """The peer: connect, send nothing, return what the destination says until it hangs up."""

    def work() -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(PATIENCE)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data

    return work


def _error_text(data: bytes) -> str:
    status, _nfds, _reserved, length = FRAME.unpack_from(data)
    assert status == Status.ERROR, data
    return str(json.loads(data[FRAME.size : FRAME.size + length])["error"])


class Destination:
    """runner.receive() in a thread, on a migration socket that anyone may connect to (so that
    the credential check alone decides)."""

    def __init__(
        self, path: Path, allow_uids: tuple[int, ...] = (), timeout: float = PATIENCE
    ) -> None:
        self.listener = runner.listen(f"unix:{path}")
        path.chmod(0o666)
        self.error: BaseException | None = None
        self.machine: Any = None
        options = ReceiveOptions(overrides={"serial": "none"}, timeout=0.5)

        def serve() -> None:
            try:
                self.machine = runner.receive(
                    f"unix:{path}", options, timeout, self.listener, allow_uids
                )
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(2 * PATIENCE)
        assert not self.thread.is_alive()


@root_only
def test_another_uid_is_refused_with_a_reason_and_the_destination_keeps_waiting(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared_dir / "mig.sock"
    with caplog.at_level(logging.INFO):
        dest = Destination(path, timeout=REFUSED_PEER_WAIT)
        status, data = _in_child(NOBODY, _connect_and_read(path))()
        assert dest.thread.is_alive(), "a refused peer ended the wait"
        dest.join()
    assert status == 0, data
    text = _error_text(data)
    assert f"uid {NOBODY} is not this VMM's uid 0" in text and f"--allow-uid {NOBODY}" in text
    refusals = _warnings(caplog, "refused a hand-off connection")
    assert len(refusals) == 1 and f"uid {NOBODY}" in refusals[0], refusals
    # The destination went on waiting for its sender, until its own timeout.
    assert isinstance(dest.error, runner.IncomingError)
    assert "no hand-off arrived" in str(dest.error)


@root_only
def test_an_allowed_uid_passes_the_credential_check(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared_dir / "mig.sock"
    with caplog.at_level(logging.INFO):
        dest = Destination(path, allow_uids=(NOBODY,))
        status, data = _in_child(NOBODY, _connect_and_read(path))()
        dest.join()
    assert status == 0 and data == b"", data  # no refusal: the receiver waited for START
    assert not _warnings(caplog, "refused a hand-off connection")
    accepted = [r.getMessage() for r in caplog.records if "accepted a hand-off" in r.getMessage()]
    assert len(accepted) == 1 and f"uid {NOBODY}" in accepted[0]
    # Past the check, the hand-off itself failed: the peer sent nothing.
    assert isinstance(dest.error, runner.IncomingError)
    assert "incoming hand-off failed" in str(dest.error)


@root_only
def test_root_is_refused_by_a_destination_that_is_not_root(shared_dir: Path) -> None:
    own = shared_dir / "nobody"
    own.mkdir(mode=0o755)
    os.chown(own, NOBODY, NOBODY)
    path = own / "mig.sock"

    def destination() -> bytes:
        try:
            runner.receive(f"unix:{path}", ReceiveOptions(timeout=0.5), timeout=REFUSED_PEER_WAIT)
        except runner.IncomingError as e:
            return str(e).encode()
        return b"accepted"

    wait = _in_child(NOBODY, destination)
    wait_for_path(path)
    assert path.stat().st_uid == NOBODY
    data = _connect_and_read(path)()  # this process is root
    status, result = wait()
    assert status == 0, result
    assert f"uid 0 is not this VMM's uid {NOBODY}" in _error_text(data)
    assert b"no hand-off arrived" in result


@root_only
@needs_kvm
def test_an_allowed_sender_of_another_uid_cannot_name_the_console_file(
    shared_dir: Path,
) -> None:
    import fuzzkit  # a hand-off written frame by frame

    seed = fuzzkit.real_seeds(HAVE_KVM)[-1]
    target = shared_dir / "written-by-root.log"
    config = seed.config | {"serial": f"file:{target}"}
    frames = fuzzkit.valid_prefix(seed)
    frames[2] = fuzzkit.Frame(frames[2].kind, json.dumps(config).encode())
    path = shared_dir / "mig.sock"
    listener = runner.listen(f"unix:{path}")
    path.chmod(0o666)
    box: dict[str, Any] = {}

    def serve() -> None:
        options = ReceiveOptions(timeout=PATIENCE)  # no --serial given to this destination
        try:
            box["machine"] = runner.receive(f"unix:{path}", options, PATIENCE, listener, (NOBODY,))
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def source() -> bytes:
        factory = fuzzkit.FdFactory(seed)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(PATIENCE)
        s.connect(str(path))
        statuses = []
        for frame in frames:
            fuzzkit.send_frame(s, frame, [factory.make(kind) for kind in frame.fds])
            status, _nfds, _reserved, length = FRAME.unpack(s.recv(FRAME.size, socket.MSG_WAITALL))
            if length:
                s.recv(length, socket.MSG_WAITALL)
            statuses.append(status)
        return bytes(statuses)

    status, statuses = _in_child(NOBODY, source)()
    thread.join(2 * PATIENCE)
    machine = box.get("machine")
    try:
        assert status == 0 and statuses == bytes(len(frames)), statuses
        assert machine is not None, box.get("error")
        assert machine.config.serial == "stdio"
    finally:
        if machine is not None:
            machine.close()
    assert not target.exists(), "the sender chose a file for this VMM to write"


@root_only
@needs_kvm
def test_run_incoming_allow_uid_option(
    vmm_factory: Any, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI passes --allow-uid through: the same peer is refused (logged, the VMM still
    waits) without it and accepted with it (its attempt then fails, as it sends nothing,
    and the VMM goes on waiting for the next one)."""
    monkeypatch.setenv("INTRAHOST_MIGRATION_TIMEOUT", "1")  # the accepted peer sends nothing
    outcomes = {}
    for allow in (False, True):
        mig = shared_dir / f"mig-{allow}.sock"
        extra = ["--allow-uid", str(NOBODY)] if allow else []
        vmm: VmmProcess = vmm_factory(
            "run", "--incoming", f"unix:{mig}", *extra, name=f"dest-{allow}", wait_path=mig
        )
        mig.chmod(0o666)
        status, data = _in_child(NOBODY, _connect_and_read(mig))()
        deadline = time.monotonic() + PATIENCE
        while allow and "incoming hand-off failed" not in vmm.output():
            assert time.monotonic() < deadline, vmm.output()
            time.sleep(0.05)
        outcomes[allow] = (status, data, vmm.alive(), vmm.output())
        vmm.kill()
    status, data, alive, log = outcomes[False]
    assert f"--allow-uid {NOBODY}" in _error_text(data)
    assert "refused a hand-off connection" in log and alive, log
    status, data, alive, log = outcomes[True]
    assert data == b"" and f"uid {NOBODY} (allowed)" in log and alive, log
    assert "incoming hand-off failed" in log


# --- no code-bearing formats --------------------------------------------------------------------

#: Modules that turn bytes into code or arbitrary objects (multiprocessing pickles too).
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill",
                     "cloudpickle", "jsonpickle", "yaml", "copyreg", "multiprocessing",
                     "xmlrpc"}  # fmt: skip
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{name}:{node.lineno}: imports {module}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{name}:{node.lineno}: calls {func.id}()")
            dynamic_import = (
                isinstance(func, ast.Attribute)
                and func.attr == "import_module"
                and not (node.args and isinstance(node.args[0], (ast.Constant, ast.Name)))
            )
            if dynamic_import:
                found.append(f"{name}:{node.lineno}: imports a module named by data")
    return found


def test_the_checker_sees_what_it_forbids() -> None:
    bad = "import pickle\nfrom marshal import loads\neval('1')\nexec(x)\n"
    assert len(_violations(bad, "bad.py")) == 4


def test_no_code_bearing_format_in_the_package() -> None:
    package = Path(intrahost.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        found += _violations(path.read_text(), str(path.relative_to(package.parent)))
    assert not found, "\n".join(found)
