"""The secure-processor model: guest contexts, ASID binding, launch measurement."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from intrahost.sev.interface import (
    SEV_POLICY_ES,
    SEV_POLICY_NODBG,
    SEV_POLICY_NOKS,
    FirmwareError,
    GuestState,
)
from intrahost.sevmodel.firmware import (
    SECRET_HEADER,
    FirmwareFailure,
    FirmwareVersion,
    PlatformState,
    SecureProcessor,
    compute_measurement,
    derive_tik,
    expected_measurement,
    secret_mac,
)

KEY = bytes(range(32))


def make_fw(key: bytes = KEY, nonce: bytes | None = None) -> SecureProcessor:
    if nonce is None:
        fw = SecureProcessor(key, 509, 100, FirmwareVersion())
    else:
        fw = SecureProcessor(key, 509, 100, FirmwareVersion(), lambda n: nonce)
    fw.init()
    return fw


def fw_error(call: object) -> FirmwareError:
    with pytest.raises(FirmwareFailure) as info:
        call()  # type: ignore[operator]
    return info.value.code


def launched(fw: SecureProcessor, policy: int = 0, asid: int = 100, **kw: bytes) -> int:
    handle = fw.launch_start(0, policy, kw.get("dh_cert", b""), kw.get("session", b""))
    fw.activate(handle, asid)
    return handle


def test_measurement_construction_is_the_sev_api_one() -> None:
    nonce = b"N" * 16
    fw = make_fw(nonce=nonce)
    h = launched(fw, policy=0x1)
    fw.launch_update_data(h, 0x1000, b"A" * 32)
    fw.launch_update_data(h, 0x2000, b"B" * 16)
    blob = fw.launch_measure(h, 48)
    measure, mnonce = blob[:32], blob[32:]
    assert mnonce == nonce
    tik = hmac.new(KEY, b"intrahost-sev-model TIK" + struct.pack("<I", 0) * 2, "sha256").digest()
    ld = hashlib.sha256(b"A" * 32 + b"B" * 16).digest()
    message = b"\x04" + bytes((0, 24, 21)) + struct.pack("<I", 1) + ld + nonce
    assert measure == hmac.new(tik, message, "sha256").digest()
    assert measure == expected_measurement(KEY, FirmwareVersion(), 1, [b"A" * 32, b"B" * 16], nonce)


def _measure(data: list[bytes], nonce: bytes, key: bytes = KEY, policy: int = 0) -> bytes:
    fw = make_fw(key, nonce)
    h = launched(fw, policy)
    for i, d in enumerate(data):
        fw.launch_update_data(h, 0x1000 * i, d)
    return fw.launch_measure(h, 48)[:32]


def test_measurement_is_reproducible_and_changes_with_inputs() -> None:
    base = _measure([b"x" * 16], b"n" * 16)
    assert base == _measure([b"x" * 16], b"n" * 16)
    assert base != _measure([b"y" * 16], b"n" * 16)
    assert base != _measure([b"x" * 16], b"m" * 16)
    assert base != _measure([b"x" * 16], b"n" * 16, key=b"K" * 32)
    assert base != _measure([b"x" * 16], b"n" * 16, policy=1)
    # The digest is a running hash: the same bytes split differently measure the same.
    assert _measure([b"ab" * 16], b"n" * 16) == _measure([b"ab" * 8, b"ab" * 8], b"n" * 16)


def test_fresh_nonce_per_measurement() -> None:
    fw = make_fw()
    blobs = []
    for _ in range(2):
        h = launched(fw, asid=100 + len(blobs))
        fw.launch_update_data(h, 0, b"z" * 16)
        blobs.append(fw.launch_measure(h, 48))
    assert blobs[0][32:] != blobs[1][32:] and blobs[0][:32] != blobs[1][:32]
    for blob in blobs:
        assert blob[:32] == expected_measurement(KEY, FirmwareVersion(), 0, [b"z" * 16], blob[32:])


def test_tik_depends_on_the_session() -> None:
    assert derive_tik(KEY, b"", b"") != derive_tik(KEY, b"", b"s")
    assert derive_tik(KEY, b"d", b"") != derive_tik(KEY, b"", b"d")


def test_vmsa_is_measured_for_sev_es() -> None:
    fw = make_fw(nonce=b"n" * 16)
    h = launched(fw, SEV_POLICY_ES, asid=1)
    fw.launch_update_data(h, 0, b"i" * 16)
    fw.launch_update_vmsa(h, b"vmsa0")
    fw.launch_update_vmsa(h, b"vmsa1")
    got = fw.launch_measure(h, 48)[:32]
    want = expected_measurement(
        KEY, FirmwareVersion(), SEV_POLICY_ES, [b"i" * 16, b"vmsa0", b"vmsa1"], b"n" * 16
    )
    assert got == want


def test_state_machine() -> None:
    fw = make_fw()
    h = launched(fw)
    assert fw.guest_status(h) == (0, GuestState.LUPDATE, 100)
    assert fw_error(lambda: fw.launch_secret(h, b"", b"", 0)) == FirmwareError.INVALID_GUEST_STATE
    fw.launch_measure(h, 48)
    assert fw.guest_status(h)[1] == GuestState.LSECRET
    assert fw_error(lambda: fw.launch_update_data(h, 0, b"x" * 16)) == (
        FirmwareError.INVALID_GUEST_STATE
    )
    assert fw_error(lambda: fw.launch_update_vmsa(h, b"v")) == FirmwareError.INVALID_GUEST_STATE
    fw.launch_finish(h)
    assert fw.guest_status(h)[1] == GuestState.RUNNING
    for call in (
        lambda: fw.launch_finish(h),
        lambda: fw.launch_measure(h, 48),
        lambda: fw.require_state(h, GuestState.SUPDATE, "SEND_FINISH"),
    ):
        assert fw_error(call) == FirmwareError.INVALID_GUEST_STATE


def test_launch_checks() -> None:
    fw = SecureProcessor(KEY, 509, 100)
    assert fw_error(lambda: fw.launch_start(0, 0, b"", b"")) == (
        FirmwareError.INVALID_PLATFORM_STATE
    )
    fw.init()
    assert fw_error(lambda: fw.launch_start(0, 0x00FF0000, b"", b"")) == (
        FirmwareError.POLICY_FAILURE
    )
    assert fw_error(lambda: fw.launch_start(77, 0, b"", b"")) == FirmwareError.INVALID_GUEST
    h = fw.launch_start(0, 0, b"", b"")
    assert fw.state == PlatformState.WORKING
    assert fw_error(lambda: fw.launch_update_data(h, 0, b"x" * 16)) == FirmwareError.INACTIVE
    fw.activate(h, 100)
    assert fw_error(lambda: fw.launch_update_data(h, 8, b"x" * 16)) == FirmwareError.INVALID_ADDRESS
    assert fw_error(lambda: fw.launch_update_data(h, 0, b"x" * 15)) == FirmwareError.INVALID_LEN
    assert fw_error(lambda: fw.launch_update_vmsa(h, b"v")) == FirmwareError.POLICY_FAILURE
    with pytest.raises(FirmwareFailure) as info:
        fw.launch_measure(h, 10)
    e = info.value
    assert e.code == FirmwareError.INVALID_LEN and e.length == 48
    assert fw_error(lambda: fw.guest_status(999)) == FirmwareError.INVALID_GUEST


def test_asid_binding() -> None:
    fw = make_fw()
    a = launched(fw, asid=100)
    b = fw.launch_start(0, 0, b"", b"")
    assert fw_error(lambda: fw.activate(b, 100)) == FirmwareError.ASID_OWNED
    assert fw_error(lambda: fw.activate(b, 0)) == FirmwareError.INVALID_ASID
    assert fw_error(lambda: fw.activate(b, 510)) == FirmwareError.INVALID_ASID
    assert fw_error(lambda: fw.activate(a, 101)) == FirmwareError.ACTIVE
    es = fw.launch_start(0, SEV_POLICY_ES, b"", b"")
    assert fw_error(lambda: fw.activate(es, 100)) == FirmwareError.INVALID_ASID
    fw.activate(es, 1)
    # Teardown and re-use: DEACTIVATE, DECOMMISSION, then WBINVD + DF_FLUSH before rebinding.
    assert fw_error(lambda: fw.decommission(a)) == FirmwareError.ACTIVE
    fw.deactivate(a)
    assert fw_error(lambda: fw.deactivate(a)) == FirmwareError.INACTIVE
    fw.decommission(a)
    assert fw_error(lambda: fw.activate(b, 100)) == FirmwareError.DFFLUSH_REQUIRED
    assert fw_error(fw.df_flush) == FirmwareError.WBINVD_REQUIRED
    fw.wbinvd()
    fw.df_flush()
    fw.activate(b, 100)


def test_key_sharing_policy() -> None:
    fw = make_fw()
    owner = launched(fw, policy=SEV_POLICY_NOKS)
    assert fw_error(lambda: fw.launch_start(owner, 0, b"", b"")) == FirmwareError.POLICY_FAILURE
    sharer = launched(fw, policy=0, asid=101)
    other = fw.launch_start(sharer, 0, b"", b"")
    fw.activate(other, 101)  # guests sharing a key may share the ASID


def test_launch_secret_mac() -> None:
    fw = make_fw()
    h = launched(fw)
    measure = fw.launch_measure(h, 48)[:32]
    tik = derive_tik(KEY, b"", b"")
    secret, iv = b"s3cret-16-bytes!", b"I" * 16
    mac = secret_mac(tik, 0, iv, len(secret), secret, measure)
    fw.launch_secret(h, SECRET_HEADER.pack(0, iv, mac), secret, len(secret))
    bad = SECRET_HEADER.pack(0, iv, b"\0" * 32)
    assert fw_error(lambda: fw.launch_secret(h, bad, secret, len(secret))) == (
        FirmwareError.BAD_MEASUREMENT
    )
    assert fw_error(lambda: fw.launch_secret(h, b"short", secret, 16)) == FirmwareError.INVALID_LEN


def test_debug_policy() -> None:
    fw = make_fw()
    assert fw_error(lambda: fw.debug_allowed(launched(fw, SEV_POLICY_NODBG))) == (
        FirmwareError.POLICY_FAILURE
    )
    fw.debug_allowed(launched(fw, 0, asid=101))


def test_compute_measurement_truncates_policy_to_u32() -> None:
    v = FirmwareVersion()
    assert compute_measurement(b"t", v, 1 << 32, b"d", b"n") == compute_measurement(
        b"t", v, 0, b"d", b"n"
    )
