"""The ``intrahost`` command.

    intrahost run [--memory 256M] [--vcpus N] [--guest counter|hello|PATH] [--guest-args ARGS]
                  [--memory-path FILE] [--serial stdio|file:PATH|pty|none]
                  [--api-socket PATH] [--incoming unix:PATH [--allow-uid UID]...]
    intrahost status|pause|resume|stop --api-socket PATH
    intrahost migrate --api-socket PATH unix:DEST_PATH
    intrahost upgrade --api-socket PATH [--exec COMMAND] [-- NEW VMM FLAGS]

Every error a user can cause ends with one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from intrahost.errors import IntrahostError

log = logging.getLogger("intrahost")


class CliError(IntrahostError):
    """A user error on the command line."""


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (the full usage is one ``--help`` away), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    from intrahost.vmm.config import config_flags

    p = add_command(sub, "run", help="run a guest (or wait for one with --incoming)")
    # The machine's flags come from MachineConfig's fields; none has a default here, so that
    # the flags the user gave can be told apart (see explicit_run_flags).
    for name, flags in config_flags():
        group = p.add_mutually_exclusive_group() if len(flags) > 1 else p
        for flag in flags:
            spec: dict[str, Any] = {"dest": name, "help": flag.help}
            if flag.const is not None:
                spec |= {"action": "store_const", "const": flag.const}
            else:
                spec |= {"choices": flag.choices}
                if flag.type is not None:
                    spec["type"] = flag.type
            group.add_argument(flag.name, **spec)
    p.add_argument("--api-socket", help="control socket path (QMP-shaped JSON)")
    p.add_argument("--incoming", help="wait for a hand-off at unix:PATH instead of booting")
    p.add_argument(
        "--prefault",
        action="store_true",
        help="with --incoming: before the pause, map every guest page already in memory",
    )
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="with --incoming: also accept the hand-off from a VMM run by this user "
        "(repeatable; by default only this VMM's own user may hand a guest in)",
    )
    p.add_argument(
        "--incoming-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="with --incoming: give up (exit status 1) if no hand-off has succeeded after "
        "this long (default: wait until a hand-off, 'quit' or SIGTERM)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def global_options() -> _Parser:
    """The options every subcommand accepts, before or after its name: a parent parser for
    ``add_parser(..., parents=[...])`` (see :func:`add_command`). Their defaults live on the
    top-level parser only (here they are SUPPRESSed), so that a subcommand without the
    option does not overwrite a value given before the subcommand."""
    from intrahost.service.logs import FORMATS, LEVELS

    common = _Parser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=argparse.SUPPRESS,
        help="least severe log messages shown on stderr (default: warning)",
    )
    group.add_argument(
        "--log-format",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="text (journald priority prefixes when stderr is the journal) or json, one "
        "object per line (default: text)",
    )
    return common


def add_command(sub: argparse._SubParsersAction[_Parser], name: str, **kwargs: Any) -> _Parser:
    """A subcommand's parser that also takes the global options."""
    return sub.add_parser(name, parents=[global_options()], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from intrahost.version import version

    parser = _Parser(
        prog="intrahost",
        description="Run KVM guests and hand them to a new VMM process.",
        parents=[global_options()],
    )
    parser.set_defaults(log_level="warning", log_format="text")
    parser.add_argument("--version", action="version", version=f"intrahost {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    for name, text in (
        ("status", "show a VMM's status and its guest"),
        ("pause", "pause the guest"),
        ("resume", "resume the guest"),
        ("stop", "stop the VMM and its guest"),
    ):
        p = add_command(sub, name, help=text)
        p.add_argument("--api-socket", required=True)
    p = add_command(sub, "migrate", help="hand the guest to a VMM waiting with --incoming")
    p.add_argument("--api-socket", required=True)
    p.add_argument("destination", help="unix:PATH of the waiting VMM")
    p = add_command(sub, "upgrade", help="start a new VMM and hand the guest to it")
    p.add_argument("--api-socket", required=True)
    p.add_argument("--exec", dest="exec_command", help="the new VMM's command (default: this one)")
    p.add_argument(
        "--output",
        help="file for the new VMM's standard output and errors (default: discarded; the "
        "guest's console goes where --serial says)",
    )
    p.add_argument("new_flags", nargs=argparse.REMAINDER, help="-- then flags for the new VMM")
    p = add_command(sub, "selftest", help="the kernel's SEV migration selftests, on a platform")
    p.add_argument("--platform", choices=("auto", "kernel", "model"), default="auto")
    p = add_command(sub, "platform", help="the SEV model platform service")
    p.add_argument("action", choices=("serve",))
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="options of the service")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from intrahost.service.logs import configure

    configure(args.log_level, args.log_format)
    try:
        if args.command == "run":
            # vCPU threads spend their time in KVM_RUN without the GIL; when one comes back
            # (an exit, a resume) it must not wait a whole default 5 ms switch interval for
            # another thread that holds the GIL.
            sys.setswitchinterval(0.0002)
            return cmd_run(args)
        if args.command in ("status", "pause", "resume", "stop"):
            return cmd_control(args)
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "upgrade":
            return cmd_upgrade(args)
        if args.command == "selftest":
            return cmd_selftest(args)
        if args.command == "platform":
            from intrahost.sevmodel.service import main as serve

            return serve(list(args.service_args))
    except IntrahostError as e:
        print(f"intrahost: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


# --- run ---------------------------------------------------------------------------------------


def explicit_run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The MachineConfig fields the user gave flags for (None means: not given)."""
    from intrahost.vmm.config import config_flags

    given: dict[str, Any] = {}
    for name, flags in config_flags():
        value = getattr(args, name)
        if value is not None:
            parse = flags[0].parse
            given[name] = value if parse is None else parse(value)
    return given


def cmd_run(args: argparse.Namespace) -> int:
    from intrahost.migration.faults import from_environment
    from intrahost.service.notify import Notifier
    from intrahost.service.runner import StopSignals, Vmm
    from intrahost.vmm.machine import MachineConfig

    faults = from_environment()  # none unless the fault tests ask for one
    notifier = Notifier()
    # SIGTERM and SIGINT stop the VMM as `quit` does (see StopSignals); until there is a VMM
    # to stop, a signal is kept for it.
    signals = StopSignals()
    signals.install()

    if args.allow_uid and not args.incoming:
        raise CliError("--allow-uid applies only with --incoming (who may hand a guest in)")
    if any(uid < 0 for uid in args.allow_uid):
        raise CliError("--allow-uid takes a numeric user id (0 or more)")
    if args.incoming_timeout is not None and not args.incoming:
        raise CliError("--incoming-timeout applies only with --incoming")
    if args.incoming:
        return _run_incoming(args, faults, notifier, signals)

    from intrahost.vmm.machine import Machine

    config = MachineConfig(**explicit_run_flags(args))
    if args.api_socket:
        _check_api_path(args.api_socket)
    machine = Machine.create(config)
    if machine.confidential is not None and machine.confidential.record is not None:
        record = machine.confidential.record
        print(
            f"intrahost: {record.mode} guest launched on the {record.platform} platform, "
            f"measurement {record.measurement}",
            file=sys.stderr,
        )
        if record.platform == "model":
            print(
                "intrahost: notice: the model platform does not encrypt guest memory",
                file=sys.stderr,
            )
    vmm = Vmm(machine, args.api_socket, faults, notifier=notifier)
    try:
        vmm.open_api()
    except BaseException:
        machine.close()
        raise
    machine.start()
    signals.route_to(vmm.request_stop)
    return vmm.serve()


def _run_incoming(args: argparse.Namespace, faults: Any, notifier: Any, signals: Any) -> int:
    """``run --incoming``: wait (serving the control socket) until a hand-off succeeds,
    then serve the guest; ``quit``/SIGTERM while waiting exit 0, the timeout exits 1."""
    from intrahost.migration.receiver import ReceiveOptions
    from intrahost.service.runner import Incoming, Vmm, listen

    listener = listen(args.incoming)  # refuse a live socket before anything else
    options = ReceiveOptions(overrides=explicit_run_flags(args), prefault=args.prefault)
    incoming = Incoming(
        args.incoming,
        options,
        listener=listener,
        allow_uids=args.allow_uid,
        faults=faults,
        timeout=args.incoming_timeout,
    )
    signals.route_to(incoming.request_stop)
    try:
        api = incoming.serve_api(args.api_socket)
        notifier.status(f"waiting for a hand-off at {incoming.path}")
        machine = incoming.wait()
    except BaseException:
        incoming.close_api("host-error")
        raise
    if machine is None:
        why = incoming.stop_requested or "quit"
        log.info("stopped waiting for a hand-off (%s)", why)
        notifier.stopping(f"stopped waiting for a hand-off ({why})")
        incoming.close_api("host-qmp-quit" if why == "quit" else "host-signal")
        return 0
    vmm = Vmm(machine, args.api_socket, faults, arrival=incoming.arrival, notifier=notifier)
    signals.route_to(vmm.request_stop)
    if api is not None:
        vmm.adopt_api(api)
    if incoming.stop_requested:  # told to stop as the hand-off committed: stop the guest
        vmm.request_stop(incoming.stop_requested)
    return vmm.serve()


def _socket_is_live(path: str) -> bool:
    from intrahost.service.api import socket_state

    try:
        return socket_state(path) == "live"
    except OSError:
        return False


def _check_api_path(path: str) -> None:
    if _socket_is_live(path):
        raise CliError(f"api socket {path} is in use by a running VMM")


# --- control -----------------------------------------------------------------------------------


def _client(path: str) -> Any:
    from intrahost.service.qmp_client import QmpClient

    return QmpClient(path)


def cmd_control(args: argparse.Namespace) -> int:
    with _client(args.api_socket) as qmp:
        if args.command == "status":
            status = qmp.execute("query-status")
            info = qmp.execute("query-vm")
            print(json.dumps({"status": status["status"], "vm": info}, indent=2))
        elif args.command == "pause":
            qmp.execute("stop")
        elif args.command == "resume":
            qmp.execute("cont")
        elif args.command == "stop":
            qmp.execute("quit")
    return 0


# --- migrate / upgrade -------------------------------------------------------------------------


def _wait_migration(qmp: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result: dict[str, Any] = qmp.execute("query-migrate")
        if result.get("status") in ("completed", "failed"):
            return result
        time.sleep(0.01)
    raise CliError("the migration did not finish in time")


def format_breakdown(blackout: dict[str, Any]) -> str:
    keys = ("pause_us", "export_us", "transfer_us", "import_us", "resume_us", "total_us")
    parts = [f"{k[:-3]} {blackout[k]} µs" for k in keys if k in blackout]
    return "blackout: " + ", ".join(parts)


def cmd_migrate(args: argparse.Namespace) -> int:
    from intrahost.migration.protocol import parse_url

    path = parse_url(args.destination)
    if not os.path.exists(path):
        raise CliError(
            f"no VMM waits at {path}: start one with 'intrahost run --incoming unix:{path}'"
        )
    with _client(args.api_socket) as qmp:
        qmp.execute("migrate", uri=args.destination)
        result = _wait_migration(qmp)
    if result["status"] == "failed":
        raise CliError(f"migration failed: {result.get('error-desc')}")
    print(format_breakdown(result["blackout"]))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    flags = list(args.new_flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    command = (
        shlex.split(args.exec_command) if args.exec_command else [sys.executable, "-m", "intrahost"]
    )
    tty = sys.stdout.isatty()

    def phase(text: str) -> None:
        if tty:
            print(f"  {text}", flush=True)

    with _client(args.api_socket) as qmp:
        old_pid = qmp.execute("query-vm").get("pid")
        workdir = tempfile.mkdtemp(prefix="intrahost-upgrade-")
        mig = os.path.join(workdir, "migration.sock")
        output = args.output or os.devnull
        phase("starting the new VMM")
        # The new VMM outlives this command: it must not hold this command's stdout/stderr.
        from intrahost.service.runner import spawn_vmm, wait_for_socket

        with open(output, "ab") as out:
            argv = [*command, "run", "--incoming", f"unix:{mig}", "--api-socket", args.api_socket]
            # Under systemd the new VMM must become the service manager's child (see
            # spawn_vmm), in this unit's cgroup.
            new = spawn_vmm([*argv, *flags], out)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(mig):
                if not new.running():
                    raise CliError(
                        f"the new VMM exited{_status_text(new.returncode)} before the hand-off"
                    )
                if time.monotonic() > deadline:
                    raise CliError("the new VMM did not start listening within 20 s")
                time.sleep(0.005)
            wait_for_socket(mig, 1)
            phase("handing the guest over")
            qmp.execute("migrate", uri=f"unix:{mig}")
            result = _wait_migration(qmp)
        except BaseException:
            if new.running():
                new.terminate()
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if result["status"] == "failed":
            # The new VMM keeps waiting after a failed hand-off: tell it to give up.
            new.terminate()
            new.wait(10)
            raise CliError(
                "upgrade failed, the guest keeps running on the old VMM: "
                f"{result.get('error-desc')}"
            )
    phase("waiting for the old VMM to exit")
    if isinstance(old_pid, int):
        _wait_pid_gone(old_pid, 10)
    _wait_served_by(args.api_socket, new.pid, 10)
    print(format_breakdown(result["blackout"]))
    where = f" (its output: {args.output})" if args.output else ""
    print(f"new VMM pid {new.pid} serves {args.api_socket}{where}")
    return 0


def _status_text(code: int | None) -> str:
    return "" if code is None else f" with status {code}"


def cmd_selftest(args: argparse.Namespace) -> int:
    import intrahost.sevmodel  # noqa: F401  (importing it registers the "model" platform)
    from intrahost.sev.platforms import open_platform
    from intrahost.sev.selftest import CASES, run_case

    platform = open_platform(args.platform)
    print(f"sev_migrate_tests on the {platform.name} platform")
    print(f"{'case':<22} {'result':<8} {'seconds':>8}  detail")
    failed = 0
    try:
        for case in CASES:
            result = run_case(platform, case)
            failed += result.outcome == "FAILED"
            print(
                f"{result.name:<22} {result.outcome:<8} {result.seconds:>8.2f}  {result.detail}",
                flush=True,
            )
    finally:
        platform.close()
    return 1 if failed else 0


def _wait_served_by(path: str, pid: int, timeout: float) -> None:
    """Wait until the control socket at ``path`` answers from ``pid`` (the new VMM renames its
    socket into place right after it took the guest)."""
    from intrahost.service.qmp_client import QmpConnectionError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with _client(path) as qmp:
                if qmp.execute("query-vm").get("pid") == pid:
                    return
        except QmpConnectionError:
            pass
        time.sleep(0.005)
    raise CliError(f"the new VMM (pid {pid}) did not take over {path} within {timeout} s")


def _wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait until ``pid`` has exited (a zombie counts as exited: its parent may be slow to
    reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main())
