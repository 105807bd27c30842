"""newc CPIO archives (what mkosi writes and the kernel unpacks): read names, modes, sizes and
data, and write small archives.

Reading serves the benchmarks (what takes the space) and the reproducibility check (which
files differ between two builds). Writing serves the tiny test initramfs images (busybox and
a script); the image itself is written by mkosi.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from captainos.errors import CaptainError

MAGIC = (b"070701", b"070702")
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Member:
    name: str
    mode: int
    size: int
    data: bytes
    mtime: int = 0

    @property
    def is_file(self) -> bool:
        return (self.mode & 0o170000) == 0o100000


def members(blob: bytes) -> Iterator[Member]:
    """Every entry of one or more concatenated newc archives, in order."""
    offset = 0
    while offset + 110 <= len(blob):
        if blob[offset:offset + 6] not in MAGIC:
            if blob[offset:offset + 1] == b"\0":  # padding between concatenated archives
                offset += 1
                continue
            raise CaptainError(f"not a newc cpio archive at byte {offset}")
        fields = [int(blob[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, filesize, namesize = fields[1], fields[5], fields[6], fields[11]
        name_start = offset + 110
        name = blob[name_start:name_start + namesize - 1].decode(errors="surrogateescape")
        data_start = _align4(name_start + namesize)
        data = blob[data_start:data_start + filesize]
        offset = _align4(data_start + filesize)
        if name == TRAILER:
            continue
        yield Member(name.removeprefix("./"), mode, filesize, data, mtime)


Entry = tuple[str, int, bytes] | tuple[str, int, bytes, int]


def write(entries: Sequence[Entry]) -> bytes:
    """A newc archive of (name, mode, data[, rdev]) entries, with the trailer; owner root,
    mtime 0, so the same entries give the same bytes."""
    out = bytearray()
    trailer: Entry = (TRAILER, 0, b"")
    for ino, entry in enumerate([*entries, trailer], 1):
        name, mode, data = entry[0], entry[1], entry[2]
        rdev = entry[3] if len(entry) == 4 else 0
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0]
        out += b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _align4(value: int) -> int:
    return (value + 3) & ~3


def decompress(path: Path) -> bytes:
    """The uncompressed archive bytes (zstd, or plain cpio)."""
    head = path.read_bytes()[:4]
    if head == b"\x28\xb5\x2f\xfd":  # zstd frame magic
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            raise CaptainError(f"cannot decompress {path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout
    return path.read_bytes()
