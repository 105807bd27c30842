"""newc CPIO archives (what mkosi writes and the kernel unpacks): read names, modes, sizes and
data, and write small archives.

Reading serves the benchmarks (what takes the space) and the reproducibility check (which
files differ between two builds). Writing serves the tiny test initramfs images (busybox and
a script) and the container tools segment of the image (segments.py); the rest of the image
is written by mkosi.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from captainos.core.errors import CaptainError
from captainos.core.run import pipe

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
    out = io.BytesIO()
    writer = Writer(out)
    for entry in entries:
        writer.add(entry[0], entry[1], entry[2], rdev=entry[3] if len(entry) == 4 else 0)
    writer.close()
    return out.getvalue()


class Writer:
    """Streams newc entries to a binary file: owner root, one link each, inodes numbered in
    order, a fixed mtime. close() writes the trailer."""

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self.out, self.mtime, self.ino, self.offset = out, mtime, 0, 0

    def add(self, name: str, mode: int, data: bytes, *, rdev: int = 0) -> None:
        self.ino += 1
        encoded = name.encode(errors="surrogateescape") + b"\0"
        fields = [self.ino, mode, 0, 0, 1, self.mtime, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0]
        self._put(b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + encoded)
        self._put(data)

    def close(self) -> None:
        self.mtime = 0
        self.add(TRAILER, 0, b"")

    def _put(self, chunk: bytes) -> None:
        padding = b"\0" * (-len(chunk) % 4)
        self.out.write(chunk + padding)
        self.offset += len(chunk) + len(padding)


def write_tree(tree: Path, out: BinaryIO, *, mtime: int, first: Sequence[str] = (),
               leave_out: Sequence[str] = ()) -> list[str]:
    """Archive a directory tree (directories, regular files, symlinks) with paths relative to
    it, directories first, then files and links sorted by path except that those named in
    `first` lead, and return the member names; files named in `leave_out` are not archived.
    Owner, mtime and inode numbers are fixed: the same tree gives the same bytes."""
    dirs, others = [], []
    for path in sorted(tree.rglob("*")):
        rel = str(path.relative_to(tree))
        if rel in leave_out:
            continue
        if path.is_symlink() or path.is_file():
            others.append(rel)
        elif path.is_dir():
            dirs.append(rel)
        else:
            raise CaptainError(f"cannot archive {path}: not a file, directory or symlink")
    lead = [name for name in first if name in others]
    others = [*lead, *(name for name in others if name not in lead)]
    writer = Writer(out, mtime)
    for rel in dirs:
        writer.add(rel, stat.S_IFDIR | 0o755, b"")
    for rel in others:
        path = tree / rel
        if path.is_symlink():
            writer.add(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode(errors="surrogateescape"))
        else:
            writer.add(rel, stat.S_IFREG | stat.S_IMODE(path.stat().st_mode), path.read_bytes())
    writer.close()
    return [*dirs, *others]


def _align4(value: int) -> int:
    return (value + 3) & ~3


def decompress(path: Path) -> bytes:
    """The uncompressed archive bytes (zstd, or plain cpio)."""
    return decompress_data(path.read_bytes(), str(path))


def decompress_data(data: bytes, name: str = "data") -> bytes:
    """decompress() for bytes already in memory (one or more zstd frames, or plain cpio)."""
    if data[:4] == b"\x28\xb5\x2f\xfd":  # zstd frame magic
        return pipe(["zstd", "-dc"], data, error=f"cannot decompress {name}")
    return data
