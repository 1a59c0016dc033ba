"""A second VMM process for the SEV tests: ``python sev_child.py MODE SOCKET [ARGS...]``.

Prints one JSON line with what it saw (errno 0 = success), then exits (or blocks, for the
modes a test kills).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

from intrahost.sev import SEV_POLICY_ES, SevError
from intrahost.sevmodel.client import ModelPlatform


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except SevError as err:
        return err.errno
    return 0


def say(**values: object) -> None:
    print(json.dumps(values), flush=True)


def main() -> None:
    mode, path, *args = sys.argv[1:]
    if mode == "start-platform":
        platform = ModelPlatform(path)
        say(service_pid=platform.service_pid)
        return
    platform = ModelPlatform(path, autostart=False)
    if mode == "ops-on-inherited":
        vm = platform.adopt_vm(int(args[0]))
        say(
            guest_status=errno_of(vm.guest_status),
            create_vcpu=errno_of(vm.create_vcpu),
            vcpu_enter=errno_of(lambda: vm.vcpu_enter(0)),
            register_region=errno_of(lambda: vm.register_region(0x1000, 0x1000)),
        )
    elif mode == "recv-and-move":
        channel = socket.socket(fileno=int(args[0]))
        _msg, fds, _flags, _addr = socket.recv_fds(channel, 16, 1)
        src_fd = fds[0]
        dst = platform.create_vm()
        for i in range(int(args[1])):
            dst.create_vcpu(i)
        moved = errno_of(lambda: dst.move_enc_context_from(src_fd))
        src = platform.adopt_vm(src_fd)
        status = dst.guest_status if moved == 0 else None
        say(
            move=moved,
            src_dead=src.is_dead(),
            dst_dead=dst.is_dead(),
            dst_protected=[dst.vcpu_protected(i) for i in range(int(args[1]))],
            dst_status=errno_of(status) if status else None,
        )
        channel.sendall(b"done")
        channel.recv(1)  # keep the VMs until the parent is done looking
    elif mode == "move-from":
        # Blocks in MOVE when the source's vCPU is held: the test kills us there.
        dst = platform.create_vm()
        for i in range(int(args[1])):
            dst.create_vcpu(i)
        say(ready=True, dst_vm=dst.vm_id)
        say(move=errno_of(lambda: dst.move_enc_context_from(int(args[0]))))
    elif mode == "hold-vcpu":
        channel = socket.socket(fileno=int(args[0]))
        vm = platform.create_vm()
        vm.sev_es_init()
        vm.create_vcpu(0)
        vm.launch_start(SEV_POLICY_ES)
        vm.launch_update_vmsa([b"initial"])
        vmsa = vm.vcpu_enter(0)
        socket.send_fds(channel, [b"vm"], [vm.fd])
        say(entered=True, vmsa=(vmsa or b"").decode())
        time.sleep(3600)
    elif mode == "sev-fd-quirk":
        src = platform.create_vm()
        src.sev_init()
        src.launch_start(0)
        dst = platform.create_vm()
        dst.move_enc_context_from(src.fd)
        before = errno_of(dst.guest_status)
        os.dup2(platform.sev_fd, 0)  # now fd 0 of this process is a (model) /dev/sev
        status = dst.guest_status()
        say(before=before, after_state=status.state.name, handle=status.handle)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
