"""The ``intrahost`` command.

    intrahost run [--memory 256M] [--vcpus N] [--guest counter|hello|PATH] [--guest-args ARGS]
                  [--memory-path FILE] [--serial stdio|file:PATH|pty|none] [--name NAME]
                  [--api-socket PATH] [--log-file PATH] [--incoming unix:PATH [--allow-uid UID]...]
    intrahost status|pause|resume|stop|query-migrate (--api-socket PATH | --name NAME)
    intrahost migrate (--api-socket PATH | --name NAME) unix:DEST_PATH
    intrahost upgrade (--api-socket PATH | --name NAME | --all [--parallel N])
                      [--exec COMMAND] [-- NEW VMM FLAGS]
    intrahost list [--clean]
    intrahost guest-check disk IMAGE [--status-from FILE] [--output text|json]

A VMM started without ``--api-socket`` serves its control socket in the runtime directory
(:mod:`intrahost.service.registry`), where ``--name`` finds it and ``list`` lists it.

Every error a user can cause ends with one line on stderr and a non-zero exit status; with
``--output json``, commands that report print exactly one JSON document on stdout, an error
as ``{"error": {"class": ..., "desc": ...}}``. No Python traceback reaches the user (an
unexpected exception is one line too; its traceback is logged with ``--log-level debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import select
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from intrahost.errors import IntrahostError

log = logging.getLogger("intrahost")


class CliError(IntrahostError):
    """A user error on the command line."""


class UsageError(CliError):
    """The command line does not parse (argparse's errors, exit status 2)."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog


class NewVmmFailed(CliError):
    """The upgrade's new VMM exited before the hand-off; ``output`` is what it said."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (main reports them, as text or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)


# --- argument types: each names what it wants (argparse would say "invalid <lambda> value") ---


def _uid(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric user id") from None


def _fd(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _name(text: str) -> str:
    from intrahost.service.registry import RegistryError, check_name

    try:
        return check_name(text)
    except RegistryError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- the parser ---------------------------------------------------------------------------------

#: Output formats of the commands that report.
FORMATS = ("text", "json")


def global_options() -> _Parser:
    """The options every subcommand accepts, before or after its name: a parent parser for
    ``add_parser(..., parents=[...])``. Their defaults live on the top-level parser only
    (here they are SUPPRESSed), so that a subcommand without the option does not overwrite a
    value given before the subcommand."""
    from intrahost.service.logs import FORMATS as LOG_FORMATS
    from intrahost.service.logs import LEVELS

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
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="text (journald priority prefixes when stderr is the journal) or json, one "
        "object per line (default: text)",
    )
    return common


def _add_command(
    sub: argparse._SubParsersAction[_Parser],
    name: str,
    text: str,
    parents: Sequence[_Parser],
) -> _Parser:
    return sub.add_parser(name, help=text, description=text, parents=list(parents))


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output", choices=FORMATS, default="text", help="text (default) or json: one document"
    )


def _add_target(p: argparse.ArgumentParser) -> None:
    """--api-socket PATH or --name NAME: which VMM (one of them is required; checked in
    _target so that the message can say both)."""
    p.add_argument("--api-socket", help="the VMM's control socket")
    p.add_argument("--name", type=_name, help="the VMM's name (its socket in the runtime dir)")


def add_run_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``run``'s own flags. ``defaults=False`` leaves every default out (SUPPRESS), so that
    a parse yields only the flags given (what ``upgrade`` checks of the new VMM's flags)."""
    from intrahost.vmm.config import config_flags

    none: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    # The machine's flags come from MachineConfig's fields; none has a default here, so that
    # the flags the user gave can be told apart (see explicit_run_flags).
    for name, flags in config_flags():
        group = p.add_mutually_exclusive_group() if len(flags) > 1 else p
        for flag in flags:
            spec: dict[str, Any] = {"dest": name, "help": flag.help, **none}
            if flag.const is not None:
                spec |= {"action": "store_const", "const": flag.const}
            elif flag.repeat:
                spec["action"] = "append"
            else:
                spec |= {"choices": flag.choices}
                if flag.type is not None:
                    spec["type"] = flag.type
            group.add_argument(flag.name, **spec)
    p.add_argument(
        "--name",
        type=_name,
        help="this VMM's name (default vm-PID): without --api-socket, its control socket is "
        "NAME.sock in the runtime directory ($XDG_RUNTIME_DIR/intrahost or /run/intrahost)",
        **none,
    )
    p.add_argument("--api-socket", help="control socket path (QMP-shaped JSON)", **none)
    p.add_argument(
        "--log-file",
        help="once the VMM serves, append its log (its standard error) to this file",
        **none,
    )
    p.add_argument(
        "--log-fd",
        type=_fd,
        help="once the VMM serves, send its log (standard error) to this inherited file "
        "descriptor (intrahost upgrade uses it)",
        **none,
    )
    p.add_argument("--incoming", help="wait for a hand-off at unix:PATH instead of booting", **none)
    p.add_argument(
        "--prefault",
        action="store_true",
        help="with --incoming: before the pause, map every guest page already in memory",
        **none,
    )
    p.add_argument(
        "--allow-uid",
        type=_uid,
        action="append",
        metavar="UID",
        help="with --incoming: also accept the hand-off from a VMM run by this user "
        "(repeatable; by default only this VMM's own user may hand a guest in)",
        **({"default": []} if defaults else none),
    )
    p.add_argument(
        "--incoming-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --incoming: give up (exit status 1) if no hand-off has succeeded after "
        "this long (default: wait until a hand-off, 'quit' or SIGTERM)",
        **none,
    )


def build_parser() -> argparse.ArgumentParser:
    from intrahost.version import version

    parser = _Parser(
        prog="intrahost",
        description="Run KVM guests and hand them to a new VMM process.",
        parents=[global_options()],
    )
    parser.set_defaults(log_level="warning", log_format="text")
    parser.add_argument("--version", action="version", version=f"intrahost {version()}")
    common = [global_options()]
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(
        _add_command(sub, "run", "run a guest (or wait for one with --incoming)", common)
    )
    for name, text in (
        ("status", "show a VMM's status and its guest"),
        ("pause", "pause the guest"),
        ("resume", "resume the guest"),
        ("stop", "stop the VMM and its guest"),
        ("query-migrate", "show the VMM's last or current migration"),
    ):
        p = _add_command(sub, name, text, common)
        _add_target(p)
        if name in ("status", "query-migrate"):
            _add_output(p)
    p = _add_command(sub, "migrate", "hand the guest to a VMM waiting with --incoming", common)
    _add_target(p)
    _add_output(p)
    p.add_argument("destination", help="unix:PATH of the waiting VMM")
    p = _add_command(sub, "upgrade", "start a new VMM and hand the guest to it", common)
    _add_target(p)
    p.add_argument("--all", action="store_true", help="every VMM in the runtime directory")
    p.add_argument(
        "--parallel",
        type=_count,
        default=1,
        metavar="N",
        help="with --all: upgrade N VMMs at a time (default 1)",
    )
    p.add_argument("--exec", dest="exec_command", help="the new VMM's command (default: this one)")
    p.add_argument(
        "--no-prefault",
        dest="prefault",
        action="store_false",
        help="don't start the new VMM with --prefault (by default it maps the guest's resident "
        "pages before the pause, so the guest does not slow down after the hand-off)",
    )
    p.add_argument(
        "--output",
        default="text",
        metavar="text|json|FILE",
        help="text (default) or json: how to report; any other value is a file for the new "
        "VMM's standard output and log (by default it inherits the old VMM's)",
    )
    p.add_argument("new_flags", nargs=argparse.REMAINDER, help="-- then flags for the new VMM")
    p = _add_command(sub, "list", "list the VMMs in the runtime directory", common)
    p.add_argument("--clean", action="store_true", help="remove stale sockets")
    _add_output(p)
    p = _add_command(sub, "selftest", "the kernel's SEV migration selftests, on a platform", common)
    p.add_argument("--platform", choices=("auto", "kernel", "model"), default="auto")
    _add_output(p)
    p = _add_command(sub, "guest-check", "check a disk image the built-in disk guest wrote", common)
    p.add_argument("guest", choices=("disk",))
    p.add_argument("image", help="the disk image")
    p.add_argument(
        "--status-from",
        metavar="FILE",
        help="the guest's view of its completed writes: a JSON file, or a file of the "
        "guest's memory (its --memory-path file, a memory dump); without it, only the "
        "image's blocks are described",
    )
    _add_output(p)
    p = _add_command(sub, "platform", "the SEV model platform service", common)
    p.add_argument("action", choices=("serve", "stop"), help="serve, or stop the one running")
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="options of the service")
    return parser


# --- output ------------------------------------------------------------------------------------


class Output:
    """Where results and errors go: text (results on stdout, errors as one line on stderr)
    or JSON (one document on stdout, errors included)."""

    def __init__(self, fmt: str = "text", debug: bool = False) -> None:
        self.json = fmt == "json"
        self.debug = debug

    def result(self, document: Any, text: str | None) -> None:
        """Print ``document`` (JSON) or ``text`` (if not None)."""
        if self.json:
            print(json.dumps(document, indent=2))
        elif text is not None:
            print(text)

    def error(self, error_class: str, desc: str) -> None:
        if self.json:
            print(json.dumps({"error": {"class": error_class, "desc": desc}}, indent=2))
        else:
            print(f"intrahost: error: {desc}", file=sys.stderr)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for JSON output (looked at before parsing, so that a
    usage error is reported as JSON too); flags after ``--`` are the new VMM's."""
    words = list(argv)
    if "--" in words:
        words = words[: words.index("--")]
    return "--output=json" in words or any(
        a == "--output" and b == "json" for a, b in itertools.pairwise(words)
    )


def _error_class(error: BaseException) -> str:
    from intrahost.service.qmp_client import QmpError

    if isinstance(error, QmpError):
        return error.error_class
    return type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Output("json" if _wants_json(argv) else "text")
    try:
        try:
            return _main(argv, out)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`intrahost status | head -c1`): nothing more can reach it.
        # Point stdout at /dev/null so that the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except KeyboardInterrupt:
        print("intrahost: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str], out: Output) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        if out.json:
            out.error("UsageError", f"{e.prog}: {e}")
        else:
            print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    from intrahost.service.logs import configure

    configure(args.log_level, args.log_format)
    level = logging.getLogger().getEffectiveLevel()
    out.debug = level <= logging.DEBUG
    fmt = getattr(args, "output", "text")
    if fmt in FORMATS:
        out.json = fmt == "json"
    try:
        return _dispatch(args, out)
    except NewVmmFailed as e:
        if out.json:
            out.error(_error_class(e), f"{e}: {e.output.strip()}" if e.output.strip() else str(e))
        else:
            sys.stderr.write(e.output)
            out.error(_error_class(e), str(e))
        return 1
    except IntrahostError as e:
        out.error(_error_class(e), str(e))
        return 1
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as e:
        if out.debug:
            log.exception("internal error")
        hint = "" if out.debug else " (run with --log-level debug for the traceback)"
        out.error("InternalError", f"internal error: {type(e).__name__}: {e}{hint}")
        return 1


def _dispatch(args: argparse.Namespace, out: Output) -> int:
    command = args.command
    if command == "run":
        from intrahost.vmm.vcpu import install_kick_handler

        # vCPUs may start off the main thread (a hand-off's destination), where Python
        # cannot install signal handlers.
        install_kick_handler()
        # vCPU threads spend their time in KVM_RUN without the GIL; when one comes back
        # (an exit, a resume) it must not wait a whole default 5 ms switch interval for
        # another thread that holds the GIL.
        sys.setswitchinterval(0.0002)
        return cmd_run(args)
    if command in ("status", "pause", "resume", "stop", "query-migrate"):
        return cmd_control(args, out)
    if command == "migrate":
        return cmd_migrate(args, out)
    if command == "upgrade":
        return cmd_upgrade(args, out)
    if command == "list":
        return cmd_list(args, out)
    if command == "selftest":
        return cmd_selftest(args, out)
    if command == "guest-check":
        return cmd_guest_check(args, out)
    if command == "platform" and args.action == "stop":
        from intrahost.sevmodel.client import stop_main

        return stop_main(args.service_args)
    if command == "platform":
        from intrahost.sevmodel.service import main as serve

        return serve(list(args.service_args))
    raise CliError(f"unknown command {command}")


# --- run ---------------------------------------------------------------------------------------


def explicit_run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The MachineConfig fields the user gave flags for (None means: not given)."""
    from intrahost.vmm.config import config_flags

    given: dict[str, Any] = {}
    for name, flags in config_flags():
        value = getattr(args, name, None)
        if value is not None:
            parse = flags[0].parse
            given[name] = value if parse is None else parse(value)
    return given


class _LogDestination:
    """Where ``run --log-file``/``--log-fd`` sends the VMM's standard error once it serves
    (before that, errors go to whoever started it: an upgrade reads them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.fd: int | None = None
        if args.log_file is not None:
            try:
                self.fd = os.open(
                    args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as e:
                raise CliError(f"cannot open the log file {args.log_file}: {e.strerror}") from None
        elif args.log_fd is not None:
            try:
                os.fstat(args.log_fd)
            except OSError:
                raise CliError(f"--log-fd {args.log_fd} is not an open file descriptor") from None
            self.fd = args.log_fd

    def switch(self) -> None:
        """From now on, standard error goes to the destination (if one was given)."""
        if self.fd is None:
            return
        sys.stderr.flush()
        os.dup2(self.fd, 2)
        os.close(self.fd)
        self.fd = None


def cmd_run(args: argparse.Namespace) -> int:
    from intrahost.migration.faults import from_environment
    from intrahost.service import registry
    from intrahost.service.notify import Notifier
    from intrahost.service.runner import StopSignals, Vmm
    from intrahost.service.settings import RunSettings
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
    name = args.name or registry.default_name()
    api_socket = args.api_socket
    if api_socket is None:
        registry.prepare_runtime_dir()
        api_socket = registry.socket_path(name)
    logs = _LogDestination(args)
    settings = RunSettings(
        name=name,
        api_socket=os.path.abspath(api_socket),
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        log_format=getattr(args, "log_format", None),
        allow_uids=tuple(args.allow_uid),
    )
    if args.incoming:
        return _run_incoming(args, api_socket, settings, logs, faults, notifier, signals)

    from intrahost.vmm.machine import Machine

    config = MachineConfig(**explicit_run_flags(args))
    _check_api_path(api_socket)
    machine = Machine.create(config)
    if machine.confidential is not None and machine.confidential.record is not None:
        record = machine.confidential.record
        print(
            f"intrahost: {record.mode} guest launched on the {record.platform} platform, "
            f"measurement {record.measurement}",
            file=sys.stderr,
        )
        # (That the model does not encrypt guest memory is logged once, at attach.)
    vmm = Vmm(machine, api_socket, faults, settings, notifier=notifier)
    try:
        vmm.open_api()
    except BaseException:
        machine.close()
        raise
    _announce_console(machine)
    machine.start()
    logs.switch()
    signals.route_to(vmm.request_stop)
    return vmm.serve()


def _run_incoming(
    args: argparse.Namespace,
    api_socket: str,
    settings: Any,
    logs: _LogDestination,
    faults: Any,
    notifier: Any,
    signals: Any,
) -> int:
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
        api = incoming.serve_api(api_socket)
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
    _announce_console(machine)
    logs.switch()
    vmm = Vmm(machine, api_socket, faults, settings, arrival=incoming.arrival, notifier=notifier)
    signals.route_to(vmm.request_stop)
    if api is not None:
        vmm.adopt_api(api)
    if incoming.stop_requested:  # told to stop as the hand-off committed: stop the guest
        vmm.request_stop(incoming.stop_requested)
    return vmm.serve()


def _announce_console(machine: Any) -> None:
    description = machine.uart.console.description
    if description.startswith("pty:"):
        print(f"intrahost: serial console on {description[4:]}", file=sys.stderr, flush=True)


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


def _client(path: str, timeout: float | None = None) -> Any:
    from intrahost.service.qmp_client import DEFAULT_TIMEOUT, QmpClient

    return QmpClient(path, timeout=DEFAULT_TIMEOUT if timeout is None else timeout)


def _target(args: argparse.Namespace) -> str:
    """The control socket named by --api-socket or --name."""
    from intrahost.service import registry

    if args.api_socket is not None and args.name is not None:
        raise UsageError(
            "give either --api-socket or --name, not both", "", f"intrahost {args.command}"
        )
    if args.api_socket is not None:
        return str(args.api_socket)
    if args.name is not None:
        path = registry.socket_path(args.name)
        if not os.path.exists(path):
            raise CliError(
                f"no VMM named {args.name} in {registry.runtime_dir()} ('intrahost list' "
                "shows the VMMs there)"
            )
        return path
    raise UsageError(
        "which VMM? give --api-socket PATH or --name NAME", "", f"intrahost {args.command}"
    )


def cmd_control(args: argparse.Namespace, out: Output) -> int:
    path = _target(args)
    with _client(path) as qmp:
        if args.command == "status":
            status = qmp.execute("query-status")
            info = qmp.execute("query-vm")
            document: dict[str, Any] = {"status": status["status"], "vm": info}
            if info.get("disks"):
                document["block"] = qmp.execute("query-block")
            if info.get("nets"):
                document["net"] = qmp.execute("query-net")
            out.result(document, json.dumps(document, indent=2))
        elif args.command == "query-migrate":
            result = qmp.execute("query-migrate")
            out.result(result, describe_migration(result))
        elif args.command == "pause":
            qmp.execute("stop")
        elif args.command == "resume":
            qmp.execute("cont")
        elif args.command == "stop":
            qmp.execute("quit")
    return 0


def describe_migration(result: dict[str, Any]) -> str:
    """``query-migrate``'s answer as text: the status, then what there is of the rest."""
    lines = [f"migration: {result.get('status')}"]
    if "uri" in result:
        lines.append(f"destination: {result['uri']}")
    if "error-desc" in result:
        lines.append(f"error: {result['error-desc']}")
    if isinstance(result.get("blackout"), dict):
        lines.append(format_breakdown(result["blackout"]))
    return "\n".join(lines)


# --- migrate / upgrade -------------------------------------------------------------------------


def _wait_migration(qmp: Any, timeout: float = 120.0) -> dict[str, Any]:
    """``query-migrate`` once the migration has ended. Between two queries it waits for the
    source's next MIGRATION event (briefly: a source that sends none is polled), so it learns
    of the end at once instead of at the next poll, and does not keep the source's control
    thread busy, with the GIL its migration thread needs, during the pause."""
    from intrahost.service.qmp_client import QmpTimeoutError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result: dict[str, Any] = qmp.execute("query-migrate")
        if result.get("status") in ("completed", "failed"):
            return result
        with contextlib.suppress(QmpTimeoutError):
            qmp.wait_event("MIGRATION", timeout=0.02)
    raise CliError("the migration did not finish in time")


def format_breakdown(blackout: dict[str, Any]) -> str:
    keys = ("pause_us", "export_us", "transfer_us", "import_us", "resume_us", "total_us")
    parts = [f"{k[:-3]} {blackout[k]} µs" for k in keys if k in blackout]
    if blackout.get("drain_us") and parts and keys[0] in blackout:
        # The devices' share of the pause: the request in progress finishing, irqfds released.
        parts[0] += f" (drain {blackout['drain_us']} µs)"
    return "blackout: " + ", ".join(parts)


def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    from intrahost.migration.protocol import parse_url

    source = _target(args)
    path = parse_url(args.destination)
    if not os.path.exists(path):
        raise CliError(
            f"no VMM waits at {path}: start one with 'intrahost run --incoming unix:{path}'"
        )
    with _client(source) as qmp:
        qmp.execute("migrate", uri=args.destination)
        result = _wait_migration(qmp)
    if result["status"] == "failed":
        raise CliError(f"migration failed: {result.get('error-desc')}")
    out.result(result, format_breakdown(result["blackout"]))
    return 0


#: The new VMM's flags that can't differ from the running VMM's, as MachineConfig fields:
#: what the guest sees (MachineConfig.GUEST_VISIBLE) and how it was launched.
FIXED_CONFIG = ("memory", "vcpus", "guest", "guest_args", "sev", "sev_policy", "memory_path")


@dataclasses.dataclass
class UpgradeRequest:
    """One upgrade: the new VMM's command (``exec_command``: None for this intrahost), the
    flags after ``--``, and ``output_file``: a file for its output and log instead of the
    old VMM's."""

    flags: list[str]
    exec_command: str | None = None
    output_file: str | None = None
    #: Start the new VMM with ``--prefault`` (when it knows the flag).
    prefault: bool = True

    @property
    def command(self) -> list[str]:
        if self.exec_command is None:
            return [sys.executable, "-m", "intrahost"]
        try:
            command = shlex.split(self.exec_command)
        except ValueError as e:
            raise CliError(f"--exec {self.exec_command!r}: {e}") from None
        if not command:
            raise CliError("--exec needs a command")
        return command


def _flag_name(dest: str) -> str:
    from intrahost.vmm.config import config_flags

    for name, flags in config_flags():
        if name == dest:
            return "/".join(f.name for f in flags)
    return "--" + dest.replace("_", "-")


def parse_new_flags(flags: Sequence[str]) -> dict[str, Any] | None:
    """The flags given for the new VMM, by destination (MachineConfig fields converted), or
    None if they do not parse: then the new VMM itself reports why (its own message)."""
    parser = _Parser(prog="intrahost run", add_help=False)
    add_run_arguments(parser, defaults=False)
    parser.add_argument("--log-level", default=argparse.SUPPRESS)
    parser.add_argument("--log-format", default=argparse.SUPPRESS)
    try:
        given = vars(parser.parse_args(list(flags)))
        return given | explicit_run_flags(argparse.Namespace(**given))
    except IntrahostError:
        return None


def check_new_flags(given: dict[str, Any], settings: dict[str, Any] | None, api: str) -> None:
    """Refuse (before anything starts) the new VMM's flags that can't change across a
    hand-off, naming them: the guest-visible ones and the launch's (when they differ from
    the running VMM's), the control socket, the name, and --incoming (the upgrade's own)."""
    config = (settings or {}).get("config") or {}
    changed = []
    for dest in FIXED_CONFIG:
        if dest not in given or dest not in config:
            continue
        ours, theirs = given[dest], config[dest]
        if dest == "memory_path":
            ours = os.path.abspath(ours)
            theirs = theirs and os.path.abspath(theirs)
        if ours != theirs:
            changed.append(f"{_flag_name(dest)} (the running VMM has {theirs!r})")
    platform = given.get("sev_platform", "auto")
    if platform not in ("auto", config.get("sev_platform", platform)):
        changed.append(f"--platform (the running VMM has {config['sev_platform']!r})")
    if "api_socket" in given and os.path.abspath(given["api_socket"]) != os.path.abspath(api):
        changed.append(f"--api-socket (the running VMM's is {api})")
    if settings is not None and "name" in given and given["name"] != settings.get("name"):
        changed.append(f"--name (the running VMM is {settings.get('name')!r})")
    if "incoming" in given:
        changed.append("--incoming (the upgrade chooses it)")
    if "log_fd" in given:
        changed.append("--log-fd (the upgrade chooses it)")
    if changed:
        raise CliError(
            "the new VMM's flags can't change across an upgrade: "
            + "; ".join(changed)
            + "; nothing was started, the guest keeps running on the old VMM"
        )


def _running_settings(qmp: Any) -> dict[str, Any] | None:
    """The running VMM's ``query-settings`` (None from a VMM without the command)."""
    from intrahost.service.qmp_client import QmpError

    try:
        settings: dict[str, Any] = qmp.execute("query-settings")
    except QmpError as e:
        if e.error_class == "CommandNotFound":
            return None
        raise
    return settings


def _reopen(pid: int, fd: int) -> int | None:
    """A new descriptor for what process ``pid`` has open as ``fd`` (its terminal, file or
    pipe), for writing; None if it cannot be reopened (a socket, a pipe without reader,
    another user's process)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        new = os.open(f"/proc/{pid}/fd/{fd}", flags)
    except OSError as e:
        log.debug("cannot reopen fd %d of pid %d: %s", fd, pid, e.strerror)
        return None
    os.set_blocking(new, True)
    return new


def _supported_flags(command: list[str]) -> set[str]:
    """The ``run`` flags another intrahost (``--exec``) knows, from its ``run --help``."""
    try:
        probe = subprocess.run(
            [*command, "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise CliError(f"cannot start the new VMM: {command[0]} does not exist") from None
    except PermissionError:
        raise CliError(f"cannot start the new VMM: {command[0]} is not executable") from None
    except OSError as e:
        raise CliError(f"cannot start the new VMM {command[0]}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CliError(f"the new VMM's command {command[0]} did not answer 'run --help'") from None
    if probe.returncode != 0:
        raise NewVmmFailed(
            f"the new VMM's command failed ('run --help' exited with status {probe.returncode})",
            probe.stderr,
        )
    return {word.strip("[],") for word in probe.stdout.split() if word.startswith(("--", "[--"))}


class _Capture:
    """Reads a pipe until EOF in a thread: the new VMM's standard error until it switches to
    its own log destination (it closes the pipe then)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.data = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.stream.read1(65536):
                self.data += chunk

    def text(self, timeout: float = 0.0) -> str:
        self._thread.join(timeout)
        return self.data.decode(errors="replace")


@dataclasses.dataclass
class _NewVmm:
    argv: list[str]
    stdout: int
    log_fd: int | None  # passed as --log-fd (the new VMM's log after the hand-off)
    to_close: list[int]


def _new_vmm_command(
    request: UpgradeRequest,
    api: str,
    mig: str,
    settings: dict[str, Any] | None,
    given: dict[str, Any],
    old_pid: int | None,
) -> _NewVmm:
    """The new VMM's command line and output: the running VMM's settings (console, log
    level, format and destination, allowed uids, name, socket), then the flags after
    ``--``, which override them."""
    command = request.command
    known = _supported_flags(command) if request.exec_command is not None else None

    def supports(flag: str) -> bool:
        return known is None or flag in known

    top: list[str] = []
    run = ["run", "--incoming", f"unix:{mig}", "--api-socket", api]
    if request.prefault and "prefault" not in given and supports("--prefault"):
        # Mapping the guest's resident pages costs time before the pause (about 65 ms per
        # GiB here, while the guest runs) and saves the guest most of its page faults after.
        run.append("--prefault")
    to_close: list[int] = []
    if settings is not None:
        if "log_level" not in given and settings.get("log-level"):
            top += ["--log-level", str(settings["log-level"])]
        if "log_format" not in given and settings.get("log-format") and supports("--log-format"):
            top += ["--log-format", str(settings["log-format"])]
        if "name" not in given and settings.get("name") and supports("--name"):
            run += ["--name", str(settings["name"])]
        serial = (settings.get("config") or {}).get("serial")
        if "serial" not in given and serial:
            run += ["--serial", str(serial)]
        if "allow_uid" not in given:
            for uid in settings.get("allow-uid") or ():
                run += ["--allow-uid", str(uid)]
    log_fd = None
    if request.output_file is not None:
        stdout = os.open(
            request.output_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        to_close.append(stdout)
        if "log_file" not in given and supports("--log-file"):
            run += ["--log-file", request.output_file]
    else:
        reopened = _reopen(old_pid, 1) if old_pid is not None else None
        stdout = reopened if reopened is not None else os.open(os.devnull, os.O_WRONLY)
        to_close.append(stdout)
        log_file = (settings or {}).get("log-file")
        if "log_file" in given:
            pass
        elif log_file and supports("--log-file"):
            run += ["--log-file", str(log_file)]
        elif old_pid is not None and supports("--log-file"):
            log_fd = _reopen(old_pid, 2)
            if log_fd is None:
                log_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            to_close.append(log_fd)
            run += ["--log-fd", str(log_fd)]
    return _NewVmm([*command, *top, *run, *request.flags], stdout, log_fd, to_close)


def upgrade(
    api: str, request: UpgradeRequest, phase: Callable[[str], None] = lambda _text: None
) -> dict[str, Any]:
    """See :func:`_upgrade`."""
    with contextlib.ExitStack() as cleanup:
        return _upgrade(api, request, phase, cleanup)


def _upgrade(
    api: str,
    request: UpgradeRequest,
    phase: Callable[[str], None],
    cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
    """Start a new VMM with the running VMM's settings (and the request's flags over them),
    hand the guest to it, and wait until it serves ``api``; what happened, as a dict.

    Order: the running VMM's settings are read and the new flags checked before anything
    starts (a flag that can't change is refused, naming it); the new VMM's standard error is
    read until it serves (its own error, if it fails to start, is in the exception); only
    then is the guest handed over (the pause is inside that step). It returns once the old
    VMM has exited (a pidfd tells at once) and the new one answers on ``api``."""
    flags = list(request.flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    request = dataclasses.replace(request, flags=flags)
    with _client(api) as qmp:
        settings = _running_settings(qmp)
        old_pid = qmp.execute("query-vm").get("pid")
        # Opened now, while the pid surely is the running VMM's (it answered).
        old_pidfd = _open_pid(old_pid) if isinstance(old_pid, int) else None
        if old_pidfd is not None:
            cleanup.callback(os.close, old_pidfd)
        given = parse_new_flags(flags)
        if given is not None:
            check_new_flags(given, settings, api)
        import tempfile  # (here: `run`, the new VMM, has no use for it)

        workdir = tempfile.mkdtemp(prefix="intrahost-upgrade-")
        mig = os.path.join(workdir, "migration.sock")
        try:
            plan = _new_vmm_command(
                request,
                api,
                mig,
                settings,
                given or {},
                old_pid if isinstance(old_pid, int) else None,
            )
            phase("starting the new VMM")
            from intrahost.service.spawn import SpawnError, spawn_vmm

            # Its standard error comes back through a pipe until it serves (then it switches
            # to its own log destination), so that its own error reaches the user. Under
            # systemd it must become the service manager's child (see spawn_vmm).
            err_read, err_write = os.pipe2(os.O_CLOEXEC)
            try:
                new = spawn_vmm(
                    plan.argv,
                    plan.stdout,
                    err_write,
                    pass_fds=[plan.log_fd] if plan.log_fd is not None else [],
                )
            except SpawnError as e:
                os.close(err_read)
                raise CliError(f"{e}; the guest keeps running on the old VMM") from None
            finally:
                os.close(err_write)
                for fd in plan.to_close:
                    os.close(fd)
            capture = _Capture(os.fdopen(err_read, "rb"))
            try:
                result = _hand_over(qmp, new, mig, capture, phase)
            except BaseException:
                # A new VMM whose hand-off failed keeps waiting for another: tell it to stop.
                if new.running():
                    new.terminate()
                    new.wait(10)
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(mig)
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
    phase("waiting for the old VMM to exit")
    if isinstance(old_pid, int):
        _wait_pid_gone(old_pid, 10, old_pidfd)
    console = _wait_served_by(api, new.pid, 10).get("console")
    said = capture.text(timeout=2.0)
    if said:
        log.info("the new VMM said, before it served: %s", said.rstrip())
    return {
        "status": "completed",
        "api-socket": api,
        "name": (settings or {}).get("name"),
        "old-pid": old_pid,
        "new-pid": new.pid,
        "blackout": result["blackout"],
        "console": console,
        "output": request.output_file,
    }


def _hand_over(
    qmp: Any,
    new: Any,
    mig: str,
    capture: _Capture,
    phase: Callable[[str], None],
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while not os.path.exists(mig):
        if not new.running():
            status = "" if new.returncode is None else f" with status {new.returncode}"
            raise NewVmmFailed(
                f"the new VMM exited{status} before the hand-off; the "
                "guest keeps running on the old VMM",
                capture.text(timeout=2.0),
            )
        if time.monotonic() > deadline:
            raise CliError("the new VMM did not start listening within 20 s")
        time.sleep(0.005)
    phase("handing the guest over")
    qmp.execute("migrate", uri=f"unix:{mig}")
    result = _wait_migration(qmp)
    if result["status"] == "failed":
        raise CliError(
            f"upgrade failed, the guest keeps running on the old VMM: {result.get('error-desc')}"
        )
    return result


def cmd_upgrade(args: argparse.Namespace, out: Output) -> int:
    output_file = None if args.output in FORMATS else args.output
    request = UpgradeRequest(args.new_flags, args.exec_command, output_file, args.prefault)
    if args.all:
        if args.api_socket is not None or args.name is not None:
            raise UsageError(
                "--all upgrades every VMM: it takes no --api-socket or --name",
                "",
                "intrahost upgrade",
            )
        return upgrade_all(request, args.parallel, out)
    api = _target(args)
    tty = sys.stdout.isatty() and not out.json

    def phase(text: str) -> None:
        if tty:
            print(f"  {text}", flush=True)

    result = upgrade(api, request, phase)
    lines = [format_breakdown(result["blackout"])]
    where = f" (its output: {output_file})" if output_file else ""
    lines.append(f"new VMM pid {result['new-pid']} serves {api}{where}")
    console = result.get("console") or ""
    if console.startswith("pty:"):
        lines.append(f"serial console on {console[4:]}")
    out.result(result, "\n".join(lines))
    return 0


def upgrade_all(request: UpgradeRequest, parallel: int, out: Output) -> int:
    """Upgrade every live VMM of the runtime directory, ``parallel`` at a time, in name
    order. A batch always finishes; after a batch with a failure no new batch starts (the
    failed VMMs' guests keep running on their old VMMs, the rest are "skipped")."""
    from concurrent.futures import ThreadPoolExecutor

    from intrahost.service import registry

    targets = [e for e in registry.entries() if e.state == "live"]
    results: list[dict[str, Any]] = []
    failed = False
    for start in range(0, len(targets), parallel):
        batch = targets[start : start + parallel]
        if failed:
            results += [{"name": e.name, "api-socket": e.path, "result": "skipped"} for e in batch]
            continue
        with ThreadPoolExecutor(len(batch)) as pool:
            done = list(pool.map(lambda e: _upgrade_entry(e, request), batch))
        results += done
        failed = any(r["result"] == "failed" for r in done)
    counts = {k: sum(r["result"] == k for r in results) for k in ("upgraded", "failed", "skipped")}
    document = {"runtime-dir": registry.runtime_dir(), **counts, "vmms": results}
    out.result(document, _upgrade_table(results, registry.runtime_dir()))
    return 1 if failed else 0


def _upgrade_entry(entry: Any, request: UpgradeRequest) -> dict[str, Any]:
    row: dict[str, Any] = {"name": entry.name, "api-socket": entry.path}
    try:
        return row | upgrade(entry.path, request) | {"name": entry.name, "result": "upgraded"}
    except NewVmmFailed as e:
        said = e.output.strip().splitlines()
        return row | {"result": "failed", "error": str(e) + (f": {said[-1]}" if said else "")}
    except IntrahostError as e:
        return row | {"result": "failed", "error": str(e)}
    except Exception as e:
        log.debug("upgrade of %s failed", entry.name, exc_info=True)
        return row | {"result": "failed", "error": f"internal error: {type(e).__name__}: {e}"}


def _upgrade_table(results: list[dict[str, Any]], directory: str) -> str:
    if not results:
        return f"no VMM in {directory}"
    rows = [("NAME", "RESULT", "OLD PID", "NEW PID", "BLACKOUT", "DETAIL")]
    for r in results:
        blackout = (r.get("blackout") or {}).get("total_us")
        rows.append(
            (
                r["name"],
                r["result"],
                str(r.get("old-pid", "-")),
                str(r.get("new-pid", "-")),
                f"{blackout / 1000:.1f} ms" if isinstance(blackout, int) else "-",
                r.get("error", ""),
            )
        )
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --- list --------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from intrahost.service import registry

    found = registry.entries()
    stale = [e for e in found if e.state == "stale"]
    removed = [e.path for e in stale if args.clean and registry.remove_stale(e)]
    with ThreadPoolExecutor(max(1, min(8, len(found)))) as pool:
        vmms = list(pool.map(registry.describe, [e for e in found if e.state == "live"]))
    document = {
        "runtime-dir": registry.runtime_dir(),
        "vmms": vmms,
        "stale": [e.path for e in stale if e.path not in removed],
        "removed": removed,
    }
    out.result(document, _list_text(document))
    return 0


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _list_text(document: dict[str, Any]) -> str:
    lines = []
    if document["vmms"]:
        rows = [("NAME", "PID", "VERSION", "GUEST", "MEMORY", "VCPUS", "STATUS", "UPTIME", "VMM")]
        for v in document["vmms"]:
            memory = v.get("memory")
            rows.append(
                (
                    v["name"],
                    str(v.get("pid", "?")),
                    str(v.get("version", "?")),
                    str(v.get("guest", "?")),
                    f"{memory >> 20}M" if isinstance(memory, int) else "?",
                    str(v.get("vcpus", "?")),
                    v["status"],
                    _duration(v.get("guest-uptime")),
                    _duration(v.get("vmm-uptime")),
                )
            )
        lines.append(_table(rows))
    else:
        lines.append(f"no VMM in {document['runtime-dir']}")
    for path in document["stale"]:
        lines.append(f"stale socket (its VMM is gone; --clean removes it): {path}")
    for path in document["removed"]:
        lines.append(f"removed stale socket {path}")
    return "\n".join(lines)


# --- selftest ----------------------------------------------------------------------------------


def cmd_guest_check(args: argparse.Namespace, out: Output) -> int:
    """Exit status 0 if the image passes, 1 if it does not (or on an error)."""
    from intrahost.vmm.guests.diskcheck import GuestView, check_image

    view = GuestView.load(args.status_from) if args.status_from else None
    report = check_image(args.image, view)
    out.result(report.to_json(), report.summary())
    return 0 if report.ok else 1


def cmd_selftest(args: argparse.Namespace, out: Output) -> int:
    import intrahost.sevmodel  # noqa: F401  (importing it registers the "model" platform)
    from intrahost.sev.platforms import open_platform
    from intrahost.sev.selftest import CASES, run_case

    platform = open_platform(args.platform)
    text = not out.json
    suite = ""
    cases = []
    try:
        for case in CASES:
            if case.suite != suite and text:
                if suite:
                    print()
                print(f"{case.suite} on the {platform.name} platform")
                print(f"{'case':<22} {'result':<8} {'seconds':>8}  detail")
            suite = case.suite
            result = run_case(platform, case)
            cases.append(dataclasses.asdict(result))
            if text:
                print(
                    f"{result.name:<22} {result.outcome:<8} {result.seconds:>8.2f}  "
                    f"{result.detail}",
                    flush=True,
                )
    finally:
        platform.close()
    failed = sum(c["outcome"] == "FAILED" for c in cases)
    out.result({"platform": platform.name, "failed": failed, "cases": cases}, None)
    return 1 if failed else 0


def _wait_served_by(path: str, pid: int, timeout: float) -> dict[str, Any]:
    """Wait until the control socket at ``path`` answers from ``pid`` (the new VMM renames its
    socket into place right after it took the guest); its ``query-vm``."""
    from intrahost.service.qmp_client import QmpConnectionError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with _client(path) as qmp:
                info: dict[str, Any] = qmp.execute("query-vm")
                if info.get("pid") == pid:
                    return info
        except QmpConnectionError:
            pass
        time.sleep(0.002)
    raise CliError(f"the new VMM (pid {pid}) did not take over {path} within {timeout} s")


def _open_pid(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it has exited), or None if it cannot be opened
    (gone already, or no permission): then :func:`_wait_pid_gone` polls /proc."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _wait_pid_gone(pid: int, timeout: float, pidfd: int | None = None) -> None:
    """Wait until ``pid`` has exited (a zombie counts as exited: its parent may be slow to
    reap it). With ``pidfd`` (opened while ``pid`` surely was the old VMM), the kernel says
    when, at once; without, /proc is polled."""
    if pidfd is not None:
        select.select([pidfd], [], [], timeout)
        return
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
