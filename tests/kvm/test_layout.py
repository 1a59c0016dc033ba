"""The ctypes mirrors and constants against the system's <linux/kvm.h>, via the C compiler.

A C program prints ``sizeof`` and ``offsetof`` of every struct and field that
``intrahost.kvm.uapi`` declares, and the value of every ioctl number and constant that
``intrahost.kvm.constants`` uses; the test compares them with Python's view.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from intrahost.kvm import constants as K
from intrahost.kvm import uapi

HEADER = Path("/usr/include/linux/kvm.h")

# Top-level mirrors and the C type each one mirrors.
STRUCTS: list[type[ctypes.Structure]] = [
    uapi.kvm_userspace_memory_region,
    uapi.kvm_run,
    uapi.kvm_regs,
    uapi.kvm_segment,
    uapi.kvm_dtable,
    uapi.kvm_sregs,
    uapi.kvm_sregs2,
    uapi.kvm_fpu,
    uapi.kvm_xsave,
    uapi.kvm_xcr,
    uapi.kvm_xcrs,
    uapi.kvm_msr_entry,
    uapi.kvm_msrs,
    uapi.kvm_msr_list,
    uapi.kvm_cpuid_entry2,
    uapi.kvm_cpuid2,
    uapi.kvm_lapic_state,
    uapi.kvm_vcpu_events,
    uapi.kvm_mp_state,
    uapi.kvm_debugregs,
    uapi.kvm_device_attr,
    uapi.kvm_clock_data,
    uapi.kvm_pic_state,
    uapi.kvm_ioapic_state,
    uapi.kvm_irqchip,
    uapi.kvm_pit_channel_state,
    uapi.kvm_pit_state2,
    uapi.kvm_pit_config,
    uapi.kvm_enable_cap,
    uapi.kvm_irq_level,
    uapi.kvm_ioeventfd,
    uapi.kvm_irqfd,
    uapi.kvm_sev_cmd,
    uapi.kvm_sev_launch_start,
    uapi.kvm_sev_launch_update_data,
    uapi.kvm_sev_launch_secret,
    uapi.kvm_sev_launch_measure,
    uapi.kvm_sev_guest_status,
    uapi.kvm_enc_region,
]

# Fields that the installed (6.1) headers leave implicit: checked by offset of their neighbours.
IMPLICIT = {("kvm_sev_cmd", "pad0")}

# Mirrors of structs newer than the installed headers, with their size in the kernel source.
NEWER_THAN_HEADERS = {uapi.kvm_sev_init: 48}

# Constants newer than the installed headers (Linux 6.10+): must be absent, not different.
NEWER_CONSTANTS = {"KVM_X86_DEFAULT_VM", "KVM_X86_SEV_VM", "KVM_X86_SEV_ES_VM"}


def _walk(
    cls: type[ctypes.Structure | ctypes.Union], c_type: str, prefix: str, base: int
) -> list[tuple[str, str, int, int]]:
    """(C type, member path, absolute offset, size) of every field, recursively."""
    rows: list[tuple[str, str, int, int]] = []
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:
        offset = base + getattr(cls, name).offset
        if name in anonymous:  # C members of an anonymous union sit in the parent
            rows += _walk(ftype, c_type, prefix, offset)
            continue
        if (cls.__name__, name) in IMPLICIT:
            continue
        path = f"{prefix}.{name}" if prefix else name
        rows.append((c_type, path, offset, ctypes.sizeof(ftype)))
        if issubclass(ftype, ctypes.Structure | ctypes.Union):
            rows += _walk(ftype, c_type, path, offset)
        elif issubclass(ftype, ctypes.Array) and issubclass(
            ftype._type_, ctypes.Structure | ctypes.Union
        ):
            rows += _walk(ftype._type_, c_type, f"{path}[0]", offset)
    return rows


def _constants() -> dict[str, int]:
    values = {
        name: value
        for name, value in vars(K).items()
        if name.startswith("KVM_") and isinstance(value, int) and name != "KVM_API_VERSION"
    }
    values |= {f"KVM_CAP_{c.name}": c.value for c in K.Cap}
    values |= {f"KVM_EXIT_{e.name}": e.value for e in K.ExitReason}
    values |= {f"KVM_MP_STATE_{m.name}": m.value for m in K.MpState}
    return values


@pytest.fixture(scope="module")
def c_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("no C compiler or no <linux/kvm.h> on this machine")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void){",
    ]
    for struct in STRUCTS:
        c_type = f"struct {struct.__name__}"
        lines.append(f'printf("sizeof {struct.__name__} %zu\\n", sizeof({c_type}));')
        for c_t, path, _off, _size in _walk(struct, c_type, "", 0):
            key = f"{struct.__name__}.{path}"
            lines.append(f'printf("offset {key} %zu\\n", offsetof({c_t}, {path}));')
            lines.append(f'printf("size {key} %zu\\n", sizeof((({c_t} *)0)->{path}));')
    for name in _constants():
        lines += [
            f"#ifdef {name}",
            f'printf("const {name} %llu\\n", (unsigned long long)({name}));',
            "#else",
            f'printf("missing {name} 0\\n");',
            "#endif",
        ]
    lines.append("return 0;}")
    src = tmp_path_factory.mktemp("layout") / "layout.c"
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    view: dict[str, int] = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        view[f"{kind} {key}"] = int(value)
    return view


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: s.__name__)
def test_struct_layout(struct: type[ctypes.Structure], c_view: dict[str, int]) -> None:
    assert ctypes.sizeof(struct) == c_view[f"sizeof {struct.__name__}"]
    for _c_t, path, offset, size in _walk(struct, f"struct {struct.__name__}", "", 0):
        key = f"{struct.__name__}.{path}"
        assert offset == c_view[f"offset {key}"], f"offsetof {key}"
        assert size == c_view[f"size {key}"], f"sizeof {key}"


@pytest.mark.parametrize("name", sorted(_constants()))
def test_constant_value(name: str, c_view: dict[str, int]) -> None:
    value = _constants()[name]
    if f"missing {name}" in c_view:
        assert name in NEWER_CONSTANTS, f"{name} is not in <linux/kvm.h>"
        pytest.skip(f"{name} is newer than the installed headers")
    assert c_view[f"const {name}"] == value, f"{name}: C says {c_view[f'const {name}']:#x}"


@pytest.mark.parametrize("struct", list(NEWER_THAN_HEADERS), ids=lambda s: s.__name__)
def test_newer_struct_size(struct: type[ctypes.Structure]) -> None:
    # Not in the installed headers: checked against the size in the kernel source instead.
    assert ctypes.sizeof(struct) == NEWER_THAN_HEADERS[struct]


def test_every_mirror_is_checked() -> None:
    declared = {
        cls
        for cls in vars(uapi).values()
        if isinstance(cls, type)
        and issubclass(cls, uapi.Struct)
        and cls is not uapi.Struct
        and cls.__name__.startswith("kvm_")
    }
    nested = {
        t
        for s in STRUCTS
        for _n, t, *_ in s._fields_
        if isinstance(t, type) and issubclass(t, uapi.Struct)
    }
    nested |= {
        t._type_
        for s in STRUCTS
        for _n, t, *_ in s._fields_
        if isinstance(t, type) and issubclass(t, ctypes.Array)
    }
    unchecked = declared - set(STRUCTS) - set(NEWER_THAN_HEADERS) - nested
    # Anonymous C sub-structs (kvm_run's exit union members, the vcpu_events parts) are
    # checked through their parent.
    unchecked = {c for c in unchecked if not _is_nested_anywhere(c)}
    assert not unchecked, f"mirrors without a layout check: {sorted(c.__name__ for c in unchecked)}"


def _is_nested_anywhere(cls: type) -> bool:
    def contains(parent: type, depth: int = 0) -> bool:
        if depth > 4 or not hasattr(parent, "_fields_"):
            return False
        for _n, t, *_ in parent._fields_:
            if t is cls or (isinstance(t, type) and contains(t, depth + 1)):
                return True
        return False

    return any(contains(s) for s in STRUCTS)
