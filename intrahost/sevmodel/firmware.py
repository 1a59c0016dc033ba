"""The model of the AMD secure processor's SEV firmware (the "PSP").

What it keeps is what the firmware keeps: one *guest context* per handle (policy, state, the
bound ASID, the launch digest, the transport integrity key), the ASID bindings, and which ASIDs
must be flushed (WBINVD, then DF_FLUSH) before they may be bound again. The commands check the
guest state and return :class:`~intrahost.sev.interface.FirmwareError` codes by name.

Guest state machine (SEV API; the selftest library's ``sev_vm_launch*`` checks the same)::

    LAUNCH_START   -> LUPDATE
    LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA   only in LUPDATE
    LAUNCH_MEASURE  LUPDATE -> LSECRET
    LAUNCH_SECRET   only in LSECRET
    LAUNCH_FINISH   LUPDATE or LSECRET -> RUNNING
    GUEST_STATUS    any state
    SEND_FINISH / SEND_CANCEL need SUPDATE, RECEIVE_FINISH needs RUPDATE (the model never
                    enters those states, so they always report INVALID_GUEST_STATE)

Measurement (as the firmware computes it for ``LAUNCH_MEASURE``)::

    LD      = SHA-256 over every byte LAUNCH_UPDATE_DATA and LAUNCH_UPDATE_VMSA measured,
              in order (a running hash)
    TIK     = HMAC-SHA-256(platform key, "intrahost-sev-model TIK" || u32 len(dh_cert) ||
              dh_cert || u32 len(session) || session)
    MNONCE  = 16 fresh random bytes per LAUNCH_MEASURE
    MEASURE = HMAC-SHA-256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD || u32 POLICY ||
              LD || MNONCE)

``MEASURE`` is the construction of the SEV API (all integers little-endian, the three version
fields one byte each); only ``TIK`` differs: real firmware unwraps it from the guest owner's
session blob, the model derives it from its per-platform key and the blobs so that a guest
owner who knows the key can verify (:func:`expected_measurement`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from intrahost.sev.interface import (
    LAUNCH_MEASURE_BLOB_LEN,
    SEV_POLICY_ES,
    SEV_POLICY_NODBG,
    SEV_POLICY_NOKS,
    FirmwareError,
    GuestState,
)

_TIK_LABEL = b"intrahost-sev-model TIK"
_MEASURE_PREFIX = b"\x04"
_SECRET_PREFIX = b"\x01"
#: ``struct sev_data_launch_secret`` packet header: flags (u32), IV (16), MAC (32).
SECRET_HEADER = struct.Struct("<I16s32s")


class PlatformState(IntEnum):
    """The firmware's platform states."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


class FirmwareFailure(Exception):
    """A firmware command returned a non-zero status."""

    def __init__(self, code: FirmwareError, why: str, length: int | None = None) -> None:
        super().__init__(f"{code.name}: {why}")
        self.code = code
        self.why = why
        #: For INVALID_LEN answers: the length the caller must supply.
        self.length = length


@dataclass(frozen=True)
class FirmwareVersion:
    api_major: int = 0
    api_minor: int = 24
    build: int = 21


def derive_tik(platform_key: bytes, dh_cert: bytes, session: bytes) -> bytes:
    """The model's transport integrity key for a launch (see the module docstring)."""
    material = (
        _TIK_LABEL
        + struct.pack("<I", len(dh_cert))
        + dh_cert
        + struct.pack("<I", len(session))
        + session
    )
    return hmac.new(platform_key, material, hashlib.sha256).digest()


def compute_measurement(
    tik: bytes, version: FirmwareVersion, policy: int, launch_digest: bytes, mnonce: bytes
) -> bytes:
    """``MEASURE`` of the SEV API over a launch digest and a nonce."""
    message = (
        _MEASURE_PREFIX
        + bytes((version.api_major, version.api_minor, version.build))
        + struct.pack("<I", policy & 0xFFFFFFFF)
        + launch_digest
        + mnonce
    )
    return hmac.new(tik, message, hashlib.sha256).digest()


def launch_digest(measured: list[bytes]) -> bytes:
    """``LD`` for a launch that measured these blobs, in order."""
    digest = hashlib.sha256()
    for blob in measured:
        digest.update(blob)
    return digest.digest()


def expected_measurement(
    platform_key: bytes,
    version: FirmwareVersion,
    policy: int,
    measured: list[bytes],
    mnonce: bytes,
    dh_cert: bytes = b"",
    session: bytes = b"",
) -> bytes:
    """What a guest owner expects ``LAUNCH_MEASURE`` to return for this launch and nonce."""
    tik = derive_tik(platform_key, dh_cert, session)
    return compute_measurement(tik, version, policy, launch_digest(measured), mnonce)


def secret_mac(
    tik: bytes, flags: int, iv: bytes, guest_len: int, secret: bytes, measurement: bytes
) -> bytes:
    """The MAC of a ``LAUNCH_SECRET`` packet (SEV API construction)."""
    message = (
        _SECRET_PREFIX
        + struct.pack("<I", flags)
        + iv
        + struct.pack("<II", guest_len, len(secret))
        + secret
        + measurement
    )
    return hmac.new(tik, message, hashlib.sha256).digest()


@dataclass(eq=False)
class GuestContext:
    """The firmware's per-guest context (``GCTX``)."""

    handle: int
    policy: int
    key_owner: int
    tik: bytes
    state: GuestState = GuestState.LUPDATE
    asid: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    measurement: bytes | None = None


class SecureProcessor:
    """The SEV firmware: guest contexts, ASID bindings, launch commands."""

    def __init__(
        self,
        platform_key: bytes,
        max_asid: int,
        min_sev_asid: int,
        version: FirmwareVersion | None = None,
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.platform_key = platform_key
        self.max_asid = max_asid
        self.min_sev_asid = min_sev_asid
        self.version = version or FirmwareVersion()
        self.state = PlatformState.UNINIT
        self.guests: dict[int, GuestContext] = {}
        self.asid_owner: dict[int, int] = {}
        self.asids_to_flush: set[int] = set()
        self.caches_clean = True
        self._nonce = nonce
        self._next_handle = 1

    # -- platform ---------------------------------------------------------------------------
    def init(self) -> None:
        """``INIT`` (what ``sev_platform_init`` issues once)."""
        if self.state == PlatformState.UNINIT:
            self.state = PlatformState.INIT

    def wbinvd(self) -> None:
        """The CPU's WBINVD on every core: all caches written back, as DF_FLUSH requires."""
        self.caches_clean = True

    def df_flush(self) -> None:
        """``DF_FLUSH``: deactivated ASIDs may be bound again."""
        if not self.caches_clean:
            raise FirmwareFailure(FirmwareError.WBINVD_REQUIRED, "WBINVD must precede DF_FLUSH")
        self.asids_to_flush.clear()

    # -- guest lifecycle --------------------------------------------------------------------
    def _guest(self, handle: int) -> GuestContext:
        guest = self.guests.get(handle)
        if guest is None:
            raise FirmwareFailure(FirmwareError.INVALID_GUEST, f"no guest with handle {handle}")
        return guest

    def launch_start(self, handle: int, policy: int, dh_cert: bytes, session: bytes) -> int:
        """``LAUNCH_START``: a new guest context in LUPDATE; returns its handle."""
        if self.state == PlatformState.UNINIT:
            raise FirmwareFailure(
                FirmwareError.INVALID_PLATFORM_STATE, "the platform is not initialised"
            )
        required = ((policy >> 16) & 0xFF, (policy >> 24) & 0xFF)
        if required > (self.version.api_major, self.version.api_minor):
            raise FirmwareFailure(
                FirmwareError.POLICY_FAILURE,
                f"policy requires API {required[0]}.{required[1]}, firmware is "
                f"{self.version.api_major}.{self.version.api_minor}",
            )
        key_owner = 0
        if handle:
            shared = self._guest(handle)
            if shared.policy & SEV_POLICY_NOKS:
                raise FirmwareFailure(
                    FirmwareError.POLICY_FAILURE, f"guest {handle} forbids key sharing (NOKS)"
                )
            key_owner = shared.key_owner
        new_handle = self._next_handle
        self._next_handle += 1
        self.guests[new_handle] = GuestContext(
            handle=new_handle,
            policy=policy,
            key_owner=key_owner or new_handle,
            tik=derive_tik(self.platform_key, dh_cert, session),
        )
        self.state = PlatformState.WORKING
        return new_handle

    def activate(self, handle: int, asid: int) -> None:
        """``ACTIVATE``: bind ``asid`` to the guest's key."""
        guest = self._guest(handle)
        if guest.asid:
            raise FirmwareFailure(FirmwareError.ACTIVE, f"guest {handle} is already active")
        if not 1 <= asid <= self.max_asid:
            raise FirmwareFailure(FirmwareError.INVALID_ASID, f"ASID {asid} is out of range")
        if guest.policy & SEV_POLICY_ES and asid >= self.min_sev_asid:
            raise FirmwareFailure(
                FirmwareError.INVALID_ASID, f"an SEV-ES guest needs an SEV-ES ASID, not {asid}"
            )
        owner = self.asid_owner.get(asid)
        if owner is not None and owner != guest.key_owner:
            raise FirmwareFailure(FirmwareError.ASID_OWNED, f"ASID {asid} is bound to a guest")
        if asid in self.asids_to_flush:
            raise FirmwareFailure(
                FirmwareError.DFFLUSH_REQUIRED, f"ASID {asid} was deactivated and not flushed"
            )
        guest.asid = asid
        self.asid_owner[asid] = guest.key_owner

    def deactivate(self, handle: int) -> None:
        """``DEACTIVATE``: unbind the guest's ASID; it needs a DF_FLUSH before reuse."""
        guest = self._guest(handle)
        if not guest.asid:
            raise FirmwareFailure(FirmwareError.INACTIVE, f"guest {handle} is not active")
        asid, guest.asid = guest.asid, 0
        if not any(g.asid == asid for g in self.guests.values()):
            self.asid_owner.pop(asid, None)
            self.asids_to_flush.add(asid)
        self.caches_clean = False

    def decommission(self, handle: int) -> None:
        """``DECOMMISSION``: delete the guest context."""
        guest = self._guest(handle)
        if guest.asid:
            raise FirmwareFailure(FirmwareError.ACTIVE, f"guest {handle} is still active")
        del self.guests[handle]
        if not self.guests:
            self.state = PlatformState.INIT

    # -- launch ------------------------------------------------------------------------------
    def _launching(self, handle: int, command: str) -> GuestContext:
        guest = self._guest(handle)
        if guest.state != GuestState.LUPDATE:
            raise FirmwareFailure(
                FirmwareError.INVALID_GUEST_STATE,
                f"{command} needs state LUPDATE, guest {handle} is {guest.state.name}",
            )
        if not guest.asid:
            raise FirmwareFailure(FirmwareError.INACTIVE, f"guest {handle} has no ASID")
        return guest

    def launch_update_data(self, handle: int, address: int, data: bytes) -> None:
        """``LAUNCH_UPDATE_DATA``: measure ``data`` (16-byte aligned address and length)."""
        guest = self._launching(handle, "LAUNCH_UPDATE_DATA")
        if address % 16:
            raise FirmwareFailure(
                FirmwareError.INVALID_ADDRESS, f"address {address:#x} is not 16-byte aligned"
            )
        if not data or len(data) % 16:
            raise FirmwareFailure(
                FirmwareError.INVALID_LEN, f"length {len(data)} is not a multiple of 16"
            )
        guest.digest.update(data)

    def launch_update_vmsa(self, handle: int, vmsa: bytes) -> None:
        """``LAUNCH_UPDATE_VMSA``: measure one vCPU's VMSA (SEV-ES guests only)."""
        guest = self._launching(handle, "LAUNCH_UPDATE_VMSA")
        if not guest.policy & SEV_POLICY_ES:
            raise FirmwareFailure(
                FirmwareError.POLICY_FAILURE, f"guest {handle} is not an SEV-ES guest"
            )
        guest.digest.update(vmsa)

    def launch_measure(self, handle: int, length: int) -> bytes:
        """``LAUNCH_MEASURE``: measurement || nonce; the guest moves to LSECRET."""
        guest = self._guest(handle)
        if guest.state != GuestState.LUPDATE:
            raise FirmwareFailure(
                FirmwareError.INVALID_GUEST_STATE,
                f"LAUNCH_MEASURE needs state LUPDATE, guest {handle} is {guest.state.name}",
            )
        if length < LAUNCH_MEASURE_BLOB_LEN:
            raise FirmwareFailure(
                FirmwareError.INVALID_LEN,
                f"the measurement needs {LAUNCH_MEASURE_BLOB_LEN} bytes",
                length=LAUNCH_MEASURE_BLOB_LEN,
            )
        mnonce = self._nonce(16)
        measure = compute_measurement(
            guest.tik, self.version, guest.policy, guest.digest.digest(), mnonce
        )
        guest.measurement = measure
        guest.state = GuestState.LSECRET
        return measure + mnonce

    def launch_secret(self, handle: int, header: bytes, secret: bytes, guest_len: int) -> None:
        """``LAUNCH_SECRET``: check the packet's MAC (the model's transport is not encrypted)."""
        guest = self._guest(handle)
        if guest.state != GuestState.LSECRET:
            raise FirmwareFailure(
                FirmwareError.INVALID_GUEST_STATE,
                f"LAUNCH_SECRET needs state LSECRET, guest {handle} is {guest.state.name}",
            )
        if len(header) != SECRET_HEADER.size:
            raise FirmwareFailure(
                FirmwareError.INVALID_LEN, f"the packet header is {SECRET_HEADER.size} bytes"
            )
        if guest_len != len(secret):
            raise FirmwareFailure(FirmwareError.INVALID_LEN, "guest and transport lengths differ")
        flags, iv, mac = SECRET_HEADER.unpack(header)
        assert guest.measurement is not None
        expected = secret_mac(guest.tik, flags, iv, guest_len, secret, guest.measurement)
        if not hmac.compare_digest(mac, expected):
            raise FirmwareFailure(FirmwareError.BAD_MEASUREMENT, "the packet's MAC does not match")

    def launch_finish(self, handle: int) -> None:
        """``LAUNCH_FINISH``: the guest becomes RUNNING."""
        guest = self._guest(handle)
        if guest.state not in (GuestState.LUPDATE, GuestState.LSECRET):
            raise FirmwareFailure(
                FirmwareError.INVALID_GUEST_STATE,
                f"LAUNCH_FINISH needs LUPDATE or LSECRET, guest {handle} is {guest.state.name}",
            )
        guest.state = GuestState.RUNNING

    def guest_status(self, handle: int) -> tuple[int, GuestState, int]:
        """``GUEST_STATUS``: (policy, state, asid)."""
        guest = self._guest(handle)
        return guest.policy, guest.state, guest.asid

    def require_state(self, handle: int, state: GuestState, command: str) -> None:
        """State check of the commands the model implements only that far (SEND/RECEIVE)."""
        guest = self._guest(handle)
        if guest.state != state:
            raise FirmwareFailure(
                FirmwareError.INVALID_GUEST_STATE,
                f"{command} needs state {state.name}, guest {handle} is {guest.state.name}",
            )

    def debug_allowed(self, handle: int) -> None:
        """``DBG_DECRYPT``/``DBG_ENCRYPT`` policy check."""
        guest = self._guest(handle)
        if guest.policy & SEV_POLICY_NODBG:
            raise FirmwareFailure(
                FirmwareError.POLICY_FAILURE, f"guest {handle}'s policy forbids debugging"
            )
