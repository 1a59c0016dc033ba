"""Check a disk image the built-in disk guest wrote: which blocks carry which sequence
numbers, which are torn or corrupt, and whether every write the guest saw complete is there.

The disk guest writes 4 KiB blocks round-robin: sequence number ``s`` (from 1) goes to block
``(s - 1) % blocks``, and each block carries a header (magic, generation, its own index, the
sequence number, the run's block count) and a zlib CRC-32 of the whole block (docs/guests.md,
:mod:`~intrahost.vmm.guests.layout`). On its own, :func:`scan_image` tells what every block of
an image holds. Given the guest's view of its writes (:class:`GuestView`: for every block the
last sequence number it saw complete, from its memory via
:meth:`~intrahost.vmm.guests.probe.DiskProbe.view` or from a JSON file), :func:`check_image`
also says whether the image holds every write the guest saw complete.

Ordering rules the check relies on (the guest keeps them): it never has two requests in
flight for one block, so a block has at most one write the guest has not seen complete, the
one of sequence ``last + blocks`` (``block + 1`` for a block with no completed write); and
that write was submitted only if its sequence number is at most ``writes_submitted``. A block
may therefore hold the last completed write or, if the next one was submitted, that one (or a
torn mix of the two: the device had not finished it). Anything else is a lost write.

Check the image of a stopped guest, or of a paused one whose device finished its requests
(read the guest's view after pausing): a running guest keeps changing both.
"""

from __future__ import annotations

import enum
import json
import mmap
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intrahost.errors import IntrahostError
from intrahost.vmm.guests import layout
from intrahost.vmm.guests.layout import DiskState

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

#: Blocks read per chunk: a chunk of 1 MiB keeps the scan fast without holding the image.
_CHUNK_BLOCKS = 256
_HEADER = struct.Struct("<QQQQQI")
_ZERO_BLOCK = bytes(layout.DISK_BLOCK_SIZE)
_ZERO_CRC = bytes(4)
#: At most this many problem blocks are listed in a report (all are counted).
MAX_LISTED = 64


class DiskImageUnreadable(IntrahostError):
    """The disk image cannot be read."""


class GuestViewInvalid(IntrahostError):
    """The guest's view of its writes (a JSON file or guest memory) is unusable."""


class BlockKind(enum.Enum):
    """What a block of the image holds."""

    EMPTY = "empty"  # all zero: never written
    VALID = "valid"  # a disk-guest block whose CRC matches
    CORRUPT = "corrupt"  # the disk guest's magic, but the CRC or a reserved field is wrong
    FOREIGN = "foreign"  # anything else


@dataclass(frozen=True)
class BlockHeader:
    """One block of the image: its kind and, unless EMPTY or FOREIGN, its header."""

    index: int
    kind: BlockKind
    generation: int = 0
    block: int = 0
    seq: int = 0
    blocks: int = 0


@dataclass(frozen=True)
class GuestView:
    """What the guest saw complete: ``last_seq[b]`` is the sequence number of the last write
    to block ``b`` it saw complete (0: none), ``writes_submitted`` the highest sequence
    number it submitted."""

    generation: int
    blocks: int
    writes_submitted: int
    last_seq: Sequence[int]

    def __post_init__(self) -> None:
        if self.blocks < 1 or len(self.last_seq) != self.blocks:
            raise GuestViewInvalid(
                f"the guest view has {len(self.last_seq)} sequence numbers for {self.blocks} blocks"
            )
        for block, seq in enumerate(self.last_seq):
            if seq and ((seq - 1) % self.blocks != block or seq > self.writes_submitted):
                raise GuestViewInvalid(
                    f"the guest view says block {block} last completed sequence {seq}, which "
                    f"the guest never wrote there (blocks={self.blocks}, "
                    f"writes_submitted={self.writes_submitted})"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "blocks": self.blocks,
            "writes_submitted": self.writes_submitted,
            "last_seq": list(self.last_seq),
        }

    @classmethod
    def from_json(cls, data: Any) -> GuestView:
        try:
            return cls(
                generation=int(data["generation"]),
                blocks=int(data["blocks"]),
                writes_submitted=int(data["writes_submitted"]),
                last_seq=tuple(int(seq) for seq in data["last_seq"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise GuestViewInvalid(
                "a guest view is a JSON object with generation, blocks, writes_submitted "
                f"and last_seq (a list of blocks integers): {error!r}"
            ) from None

    @classmethod
    def from_memory(cls, mem: ReadableBuffer) -> GuestView:
        """The view in the disk guest's memory (guest-physical address A at index A).

        Read it from a paused or stopped guest. On a running one it is usable but already
        old: the guest stores a block's sequence number before it counts the write, and this
        reads ``writes_submitted`` after the table.
        """
        try:
            status = layout.read_disk_status(mem)
            if status.state < DiskState.RUNNING or not status.blocks:
                raise GuestViewInvalid(
                    f"the disk guest has not started its workload (state {status.state}, "
                    f"exit code {status.exit_code})"
                )
            table = layout.read_disk_seq_table(mem, status.blocks)
            submitted = layout.read_disk_status(mem).writes_submitted
        except (layout.GuestStatusMissing, layout.GuestLayoutError) as error:
            raise GuestViewInvalid(str(error)) from None
        return cls(status.generation, status.blocks, submitted, table)

    @classmethod
    def load(cls, path: str | Path) -> GuestView:
        """Read a guest view from a JSON file written with :meth:`to_json`, or from a file of
        the disk guest's memory (a ``--memory-path`` file, a memory dump): a file that starts
        with ``{`` is JSON."""
        try:
            with open(path, "rb") as file:
                if file.read(1) != b"{":
                    if not file.seek(0, 2):
                        raise GuestViewInvalid(f"{path} is empty")
                    with mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as memory:
                        return cls.from_memory(memory)
                file.seek(0)
                data = json.loads(file.read())
        except OSError as error:
            raise GuestViewInvalid(f"cannot read {path}: {error.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise GuestViewInvalid(f"{path} is not JSON: {error}") from None
        return cls.from_json(data)


class Verdict(enum.Enum):
    """How one block compares with the guest's view."""

    OK = "ok"  # it holds the last write the guest saw complete
    NEWER = "newer"  # it holds the next write, submitted but not seen complete
    TORN_IN_FLIGHT = "torn-in-flight"  # corrupt, while a write to it was in flight
    UNWRITTEN = "unwritten"  # the guest saw no write to it complete, and none was in flight
    LOST = "lost"  # a write the guest saw complete is not there


@dataclass
class CheckReport:
    """The result of :func:`check_image`."""

    image_blocks: int
    kinds: dict[str, int] = field(default_factory=dict)
    #: Per generation found on the image: blocks, lowest and highest sequence number.
    generations: dict[int, dict[str, int]] = field(default_factory=dict)
    corrupt: list[int] = field(default_factory=list)
    misplaced: list[int] = field(default_factory=list)  # valid, but the header names another block
    #: With a guest view: counts per :class:`Verdict`, and the blocks whose write was lost.
    verdicts: dict[str, int] | None = None
    lost: list[dict[str, Any]] = field(default_factory=list)
    guest: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        """No lost write; without a guest view: no corrupt or misplaced block."""
        if self.verdicts is not None:
            return self.verdicts.get(Verdict.LOST.value, 0) == 0 and not self.misplaced
        return not self.corrupt and not self.misplaced

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "image_blocks": self.image_blocks,
            "kinds": self.kinds,
            "generations": {f"{gen:#x}": info for gen, info in self.generations.items()},
            "corrupt": self.corrupt[:MAX_LISTED],
            "misplaced": self.misplaced[:MAX_LISTED],
            "guest": self.guest,
            "verdicts": self.verdicts,
            "lost": self.lost[:MAX_LISTED],
        }

    def summary(self) -> str:
        """A few lines for people."""
        kinds = ", ".join(f"{count} {kind}" for kind, count in self.kinds.items() if count)
        lines = [f"{self.image_blocks} blocks of 4 KiB: {kinds or 'none'}"]
        for generation, info in self.generations.items():
            lines.append(
                f"generation {generation:#x}: {info['blocks']} blocks, sequence numbers "
                f"{info['min_seq']}..{info['max_seq']}"
            )
        if self.corrupt:
            lines.append(f"corrupt blocks (torn or damaged): {_listing(self.corrupt)}")
        if self.misplaced:
            lines.append(f"blocks whose header names another block: {_listing(self.misplaced)}")
        if self.verdicts is not None and self.guest is not None:
            verdicts = ", ".join(f"{n} {v}" for v, n in self.verdicts.items() if n)
            lines.append(
                f"against the guest (generation {self.guest['generation']:#x}, "
                f"{self.guest['blocks']} blocks, {self.guest['writes_submitted']} writes "
                f"submitted): {verdicts}"
            )
            for entry in self.lost[:MAX_LISTED]:
                lines.append(
                    f"lost write: block {entry['block']} should hold sequence "
                    f"{entry['expected']}, holds {entry['found']}"
                )
        lines.append(
            "OK: every write the guest saw complete is on the image"
            if self.ok and self.verdicts is not None
            else "OK"
            if self.ok
            else "FAILED"
        )
        return "\n".join(lines)


def _listing(blocks: list[int]) -> str:
    shown = ", ".join(str(b) for b in blocks[:MAX_LISTED])
    return shown + (f" ... ({len(blocks)} in all)" if len(blocks) > MAX_LISTED else "")


def parse_block(index: int, data: bytes) -> BlockHeader:
    """Classify one 4 KiB block."""
    if data[:8] != layout.DISK_BLOCK_MAGIC:
        kind = BlockKind.EMPTY if data == _ZERO_BLOCK else BlockKind.FOREIGN
        return BlockHeader(index, kind)
    _, generation, block, seq, blocks, crc = _HEADER.unpack_from(data)
    crc_end = layout.BLK_CRC + 4
    computed = zlib.crc32(data[: layout.BLK_CRC])
    computed = zlib.crc32(_ZERO_CRC, computed)
    computed = zlib.crc32(data[crc_end:], computed)
    reserved_zero = data[crc_end : layout.BLK_HEADER_SIZE] == bytes(
        layout.BLK_HEADER_SIZE - crc_end
    )
    kind = BlockKind.VALID if computed == crc and reserved_zero else BlockKind.CORRUPT
    return BlockHeader(index, kind, generation, block, seq, blocks)


def scan_image(path: str | Path) -> Iterator[BlockHeader]:
    """Every whole 4 KiB block of the image, classified (a partial last block is ignored)."""
    size = layout.DISK_BLOCK_SIZE
    try:
        with open(path, "rb") as image:
            index = 0
            while chunk := image.read(size * _CHUNK_BLOCKS):
                for offset in range(0, len(chunk) - size + 1, size):
                    yield parse_block(index, chunk[offset : offset + size])
                    index += 1
    except OSError as error:
        raise DiskImageUnreadable(f"cannot read the disk image {path}: {error.strerror}") from None


def check_image(path: str | Path, view: GuestView | None = None) -> CheckReport:
    """Scan the image and, given the guest's view, judge every block it wrote."""
    headers = list(scan_image(path))
    report = CheckReport(image_blocks=len(headers))
    report.kinds = {kind.value: 0 for kind in BlockKind}
    for header in headers:
        report.kinds[header.kind.value] += 1
        if header.kind is BlockKind.CORRUPT:
            report.corrupt.append(header.index)
        elif header.kind is BlockKind.VALID:
            if header.block != header.index:
                report.misplaced.append(header.index)
            info = report.generations.setdefault(
                header.generation, {"blocks": 0, "min_seq": header.seq, "max_seq": header.seq}
            )
            info["blocks"] += 1
            info["min_seq"] = min(info["min_seq"], header.seq)
            info["max_seq"] = max(info["max_seq"], header.seq)
    if view is None:
        return report
    if view.blocks > len(headers):
        raise GuestViewInvalid(
            f"the guest wrote {view.blocks} blocks but the image has only {len(headers)}: "
            "is it the right image?"
        )
    report.guest = {
        "generation": view.generation,
        "blocks": view.blocks,
        "writes_submitted": view.writes_submitted,
    }
    report.verdicts = {verdict.value: 0 for verdict in Verdict}
    for block in range(view.blocks):
        verdict, found = _judge(headers[block], view)
        report.verdicts[verdict.value] += 1
        if verdict is Verdict.LOST:
            report.lost.append({"block": block, "expected": view.last_seq[block], "found": found})
    return report


def _judge(header: BlockHeader, view: GuestView) -> tuple[Verdict, str]:
    """The verdict on one block, and what it holds (for the report)."""
    last = view.last_seq[header.index]
    pending = last + view.blocks if last else header.index + 1
    in_flight = pending <= view.writes_submitted
    seq = None
    if (
        header.kind is BlockKind.VALID
        and header.generation == view.generation
        and header.block == header.index
        and header.blocks == view.blocks
    ):
        seq = header.seq
    if last and seq == last:
        return Verdict.OK, str(seq)
    if in_flight and seq == pending:
        return Verdict.NEWER, str(seq)
    if in_flight and header.kind is BlockKind.CORRUPT:
        return Verdict.TORN_IN_FLIGHT, "a torn block"
    if not last:
        return Verdict.UNWRITTEN, _describe(header, seq)
    return Verdict.LOST, _describe(header, seq)


def _describe(header: BlockHeader, seq: int | None) -> str:
    if seq is not None:
        return f"sequence {seq}"
    if header.kind is BlockKind.VALID:
        return (
            f"generation {header.generation:#x} block {header.block} sequence {header.seq} "
            f"of {header.blocks} blocks"
        )
    return {
        BlockKind.EMPTY: "zeros",
        BlockKind.CORRUPT: "a corrupt block",
        BlockKind.FOREIGN: "foreign data",
    }[header.kind]


def expected_block(generation: int, block: int, seq: int, blocks: int) -> bytes:
    """The exact 4 KiB the guest writes for ``seq`` (the verifier only needs the CRC; tests
    use this to build images)."""
    words = [layout.DISK_BLOCK_MAGIC_U64, generation, block, seq, blocks, 0, 0, 0]
    mask = (1 << 64) - 1
    words += [
        generation ^ ((seq * layout.PAYLOAD_MUL_SEQ + i * layout.PAYLOAD_MUL_WORD) & mask)
        for i in range(8, layout.DISK_BLOCK_SIZE // 8)
    ]
    data = bytearray(struct.pack(f"<{len(words)}Q", *words))
    struct.pack_into("<I", data, layout.BLK_CRC, zlib.crc32(data))
    return bytes(data)
