"""A tap interface's fd: opened by name (``--net tap=NAME``) or adopted (``--net fd=N``).

A :class:`Tap` is a ``/dev/net/tun`` file attached to a tap interface with ``IFF_TAP |
IFF_NO_PI`` and without ``IFF_VNET_HDR``: every read returns one whole Ethernet frame and
every write sends one, with no prefix (no packet information, no virtio-net header, so no
offloads). The fd is non-blocking: the network device reads it only when the guest has
buffers for a frame, and an empty tap answers EAGAIN.

Opening by name attaches to an existing persistent tap of that name in the VMM's network
namespace (``ip tuntap add dev NAME mode tap``) or creates one that lives as long as the fd.
A single-queue tap takes one fd at a time: a name another process holds answers EBUSY, which
is reported as such. An adopted fd (as libvirt passes ``-netdev tap,fd=N``) is checked with
TUNGETIFF: it must be attached to a tap interface, without a packet-information or
virtio-net header prefix. A hand-off passes the fd to the new VMM, which adopts it the same
way: nobody reopens a tap by name while a guest uses it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from intrahost.errors import IntrahostError

TUN_PATH = "/dev/net/tun"

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

#: struct ifreq: the name, then a union whose first member is the short ifr_flags.
_IFREQ = struct.Struct("16sH22x")


class TapError(IntrahostError):
    """A tap interface cannot be opened or adopted as asked."""


class Tap:
    """An open tap fd and its interface name (see the module docstring)."""

    def __init__(self, fd: int, ifname: str) -> None:
        """Adopt ``fd`` (owned from now on), already attached and checked."""
        self.fd = fd
        self.ifname = ifname

    @classmethod
    def open(cls, name: str) -> Tap:
        """Attach to (or create) the tap ``name``; TapError (one line) when it cannot be."""
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.isspace():
            raise TapError(f"tap name {name!r}: use 1 to {IFNAMSIZ - 1} characters, no '/'")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise TapError(f"cannot open {TUN_PATH} for tap {name}: {e.strerror}") from None
        try:
            request = _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI)
            answer = fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                raise TapError(
                    f"tap {name} is in use by another process (a single-queue tap takes one "
                    "fd at a time)"
                ) from None
            if e.errno == errno.EPERM:
                raise TapError(
                    f"no permission to attach to tap {name} (it belongs to another user, or "
                    "creating it needs CAP_NET_ADMIN)"
                ) from None
            if e.errno == errno.EINVAL:
                raise TapError(
                    f"tap {name} cannot be attached as a single-queue tap (is it a tun "
                    "device or a multi-queue tap?)"
                ) from None
            raise TapError(f"cannot attach to tap {name}: {e.strerror}") from None
        ifname = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode(errors="replace")
        return cls(fd, ifname)

    @classmethod
    def from_fd(cls, fd: int, what: str = "") -> Tap:
        """Adopt an open tap fd (``--net fd=N``, or inherited in a hand-off) after checking
        it with TUNGETIFF; the fd becomes non-blocking and close-on-exec. TapError (the fd is
        left open, still the caller's) when it is not a usable tap."""
        what = what or f"fd {fd}"
        ifname, flags = describe_fd(fd, what)
        if not flags & IFF_TAP:
            raise TapError(f"{what} is a tun (layer 3) device {ifname}, not a tap")
        if not flags & IFF_NO_PI or flags & IFF_VNET_HDR:
            raise TapError(
                f"{what}: tap {ifname} was opened with a packet-information or virtio-net "
                "header prefix (intrahost needs IFF_NO_PI and no IFF_VNET_HDR)"
            )
        try:
            status = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, status | os.O_NONBLOCK)
            os.set_inheritable(fd, False)
        except OSError as e:
            raise TapError(f"{what}: {e.strerror}") from None
        return cls(fd, ifname)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def describe_fd(fd: int, what: str) -> tuple[str, int]:
    """The interface name and IFF_* flags of a tun/tap fd; TapError when it is none."""
    try:
        answer = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as e:
        if e.errno == errno.EBADF:
            raise TapError(f"{what} is not an open file descriptor") from None
        if e.errno == errno.EBADFD:
            raise TapError(f"{what} is a {TUN_PATH} fd not attached to any interface") from None
        raise TapError(f"{what} is not a tap device ({e.strerror})") from None
    name, flags = _IFREQ.unpack(answer)
    return name.rstrip(b"\0").decode(errors="replace"), flags


def tap_fd_problem(fd: int) -> str | None:
    """What makes ``fd`` unusable as a tap (None: nothing), without changing it: for a
    hand-off's destination checking the fd the source passed."""
    try:
        _ifname, flags = describe_fd(fd, "the tap fd")
    except TapError as e:
        return str(e)
    if flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) != IFF_TAP | IFF_NO_PI:
        return f"the tap fd has flags {flags:#x}, not a tap with IFF_NO_PI only"
    return None
