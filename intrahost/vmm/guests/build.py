"""Build the built-in guests from their sources with GNU ``as``, ``ld`` (and ``gcc``).

Each ``src/<name>.S`` is one guest. An assembly-only guest is assembled with ``as --32`` (the
sources switch to 16- and 64-bit code with ``.code16``/``.code64``) and linked with
``ld -m elf_i386`` and ``src/guest.ld`` into a multiboot ELF32 image. A guest that also has a
``src/<name>.c`` is 64-bit C code behind an assembly boot path: the ``.S`` is assembled with
``as --64``, the ``.c`` compiled freestanding with ``gcc -m64``, both linked with
``ld -m elf_x86_64`` into an ELF64, and ``objcopy -O elf32-i386`` makes that the multiboot
ELF32 image (multiboot loaders, QEMU's included, take ELF32 only).

Images are cached under ``$XDG_CACHE_HOME/intrahost/guests/<key>/<name>.elf`` (default
``~/.cache``), where ``<key>`` is the SHA-256 of every source file, the versions of the
tools and the build flags, so a change to any of them builds afresh. The build is
reproducible (the same inputs give the same bytes: no timestamps, no build ID, no absolute
paths) and an image appears in the cache atomically (written under a temporary name, then
renamed), so concurrent builds are safe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from intrahost.errors import IntrahostError

SOURCE_DIR = Path(__file__).parent / "src"
LINKER_SCRIPT = "guest.ld"
AS_FLAGS = ("--32", "--fatal-warnings")
LD_FLAGS = ("-m", "elf_i386", "--fatal-warnings", "--build-id=none", "-T", LINKER_SCRIPT)
#: For the guests with C code: the boot path, the C code, the 64-bit link, the conversion.
AS64_FLAGS = ("--64", "--fatal-warnings")
CC_FLAGS = (
    "-m64", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
    "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-fno-stack-protector",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns", "-fno-ident",
)  # fmt: skip
LD64_FLAGS = ("-m", "elf_x86_64", "--fatal-warnings", "--build-id=none", "-T", LINKER_SCRIPT)
OBJCOPY_FLAGS = ("-O", "elf32-i386")
#: Bump to invalidate every cached image when the recipe changes in a way the key misses.
RECIPE_VERSION = "2"
_SOURCE_SUFFIXES = (".S", ".inc", ".ld", ".c", ".h")


class GuestBuildError(IntrahostError):
    """A built-in guest cannot be built (no such guest, tools missing, or a tool failed)."""


def list_guests() -> list[str]:
    """Names of the built-in guests, sorted."""
    return sorted(path.stem for path in SOURCE_DIR.glob("*.S"))


def cache_root() -> Path:
    """The directory that holds one sub-directory of images per build key."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "intrahost" / "guests"


def build_key() -> str:
    """The SHA-256 (hex) over the sources, tool versions and flags."""
    digest = hashlib.sha256()
    digest.update(f"recipe {RECIPE_VERSION}\n".encode())
    for tool, asm_flags in (("as", AS_FLAGS), ("ld", LD_FLAGS)):
        digest.update(f"{tool} {_tool_version(tool)} {' '.join(asm_flags)}\n".encode())
    # gcc and objcopy build only the guests with C code: a machine without them still builds
    # (and caches) the others, and gets a GuestBuildError naming them for the C guests.
    c_tools: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("as", AS64_FLAGS),
        ("gcc", CC_FLAGS),
        ("ld", LD64_FLAGS),
        ("objcopy", OBJCOPY_FLAGS),
    )
    for tool, flags in c_tools:
        version = _tool_version(tool) if shutil.which(tool) else "missing"
        digest.update(f"{tool} {version} {' '.join(flags)}\n".encode())
    for path in _source_files():
        data = path.read_bytes()
        digest.update(f"{path.name} {len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def build_guest(name: str) -> Path:
    """The path of the built image of guest ``name``, building it if it is not cached."""
    if name not in list_guests():
        raise GuestBuildError(
            f"no built-in guest {name!r}; the built-in guests are: {', '.join(list_guests())}"
        )
    target = cache_root() / build_key() / f"{name}.elf"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GuestBuildError(
            f"cannot create the guest cache directory {target.parent}: {error.strerror} "
            "(set XDG_CACHE_HOME to a writable directory)"
        ) from None
    with tempfile.TemporaryDirectory(prefix="intrahost-guest-") as scratch:
        work = Path(scratch)
        # Build from copies under fixed relative names: nothing of the source checkout's path
        # or of the temporary directory's name reaches the image.
        for path in _source_files():
            shutil.copyfile(path, work / path.name)
        if (SOURCE_DIR / f"{name}.c").is_file():
            _run(["as", *AS64_FLAGS, "-o", f"{name}-boot.o", f"{name}.S"], work, name)
            _run(["gcc", *CC_FLAGS, "-c", "-o", f"{name}-c.o", f"{name}.c"], work, name)
            objects = [f"{name}-boot.o", f"{name}-c.o"]
            _run(["ld", *LD64_FLAGS, "-o", f"{name}64.elf", *objects], work, name)
            _run(["objcopy", *OBJCOPY_FLAGS, f"{name}64.elf", f"{name}.elf"], work, name)
        else:
            _run(["as", *AS_FLAGS, "-o", f"{name}.o", f"{name}.S"], work, name)
            _run(["ld", *LD_FLAGS, "-o", f"{name}.elf", f"{name}.o"], work, name)
        image = (work / f"{name}.elf").read_bytes()
    _write_atomically(target, image)
    return target


def _source_files() -> list[Path]:
    return sorted(
        (path for path in SOURCE_DIR.iterdir() if path.suffix in _SOURCE_SUFFIXES),
        key=lambda path: path.name,
    )


def _tool_path(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        package = "gcc" if tool == "gcc" else "binutils"
        raise GuestBuildError(
            f"cannot build the built-in guests: GNU {tool!r} is not on PATH "
            f"(install {package}, e.g. `apt-get install {package}`)"
        )
    return path


_versions: dict[str, str] = {}


def _tool_version(tool: str) -> str:
    """The first line of ``<tool> --version``, cached per resolved path."""
    path = _tool_path(tool)
    if path not in _versions:
        result = _run([path, "--version"], SOURCE_DIR, None)
        _versions[path] = result.splitlines()[0] if result else "unknown"
    return _versions[path]


def _run(command: list[str], cwd: Path, guest: str | None) -> str:
    """Run a build tool; its stdout, or a GuestBuildError with its stderr."""
    command = [_tool_path(command[0]), *command[1:]]
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except OSError as error:
        raise GuestBuildError(f"cannot run {command[0]}: {error.strerror}") from None
    if result.returncode != 0:
        what = f"building guest {guest!r}" if guest else "probing the toolchain"
        output = (result.stderr or result.stdout).strip() or "(no output)"
        raise GuestBuildError(
            f"{what}: `{' '.join(command)}` failed with exit status {result.returncode}:\n{output}"
        )
    return result.stdout


def _write_atomically(target: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
