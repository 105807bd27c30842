"""The initramfs as two zstd-compressed newc archives, one after the other.

The kernel unpacks concatenated archives in order into the same root (the mechanism that
prepends CPU microcode to an initrd), so the image is built as two segments:

1. the OS: mkosi's cpio (Debian trixie, image/, the kernel modules, CA certificates and the
   build manifest), compressed on every image build;
2. the container tools: the tools stage's tree (containerd, runc, nerdctl, the CNI plugins
   and their manifest), archived here and compressed once per tools entry. `ctr` is left out:
   nothing in the shipped image runs it and it costs 2.5 MB (the test profile adds it back
   for the self-test, see image.py).

The split keeps a rebuild after a change in image/ to recompressing the OS (~80 MB
uncompressed) instead of the whole ~220 MB, and lets the tools, which change only with a pin
bump, use zstd's slowest setting. Both use a 64 MiB long-distance window: the Go binaries
share most of their libraries, and at zstd's default 8 MiB window those repeats go unseen
(the measurements are in docs/benchmarks.md). The kernel's decompressor allocates the window
while it unpacks (ZSTD_WINDOWLOG_MAX is 31 on 64-bit), so 64 MiB also bounds boot memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from captainos.core import cache, pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import cpio

WINDOW = "--long=26"  # 64 MiB
OS_ZSTD = ("-19", WINDOW)
TOOLS_ZSTD = ("--ultra", "-22", "--zstd=wlog=26", WINDOW)
TOOLS_SEGMENT = "tools.cpio.zst"
# The binaries built from the containerd module and its users first, next to each other.
TOOLS_FIRST = ("usr/bin/containerd", "usr/bin/nerdctl", "usr/bin/containerd-shim-runc-v2", "usr/bin/runc")
# Built by the tools stage, not shipped: the self-test's low-level client (docs/benchmarks.md).
TOOLS_LEFT_OUT = ("usr/bin/ctr",)


def zstd_argv(options: Sequence[str], src: Path, dest: Path) -> list[str]:
    """Compress src into dest with all cores; the output does not depend on the core count."""
    return ["zstd", "-q", "-T0", *options, "-f", "-o", str(dest), str(src)]


def compress(runner: Runner, options: Sequence[str], src: Path, dest: Path) -> None:
    """Compress src into dest and remove src."""
    runner.run(zstd_argv(options, src, dest))
    src.unlink()


def tools_segment(cfg: Config, runner: Runner, tools_entry: Path) -> Path:
    """The compressed archive of the tools entry's tree (cached by that entry)."""
    # The settings above are part of this file's hash.
    parts = {"tools": tools_entry.name, "mtime": pins.SOURCE_DATE_EPOCH,
             "code": cache.code_digest(cpio.__file__, __file__)}

    def produce(work: Path) -> None:
        raw = work / "tools.cpio"
        with raw.open("wb") as out:
            cpio.write_tree(tools_entry / "tree", out, mtime=pins.SOURCE_DATE_EPOCH, first=TOOLS_FIRST,
                            leave_out=TOOLS_LEFT_OUT)
        compress(runner, TOOLS_ZSTD, raw, work / TOOLS_SEGMENT)

    return cache.cached(cfg.cache_dir, "initramfs-tools", cfg.arch.value, parts, force=cfg.force("initramfs"),
                        produce=produce) / TOOLS_SEGMENT


def concatenate(parts: Sequence[Path], dest: Path) -> None:
    """Write the segments one after the other into dest (atomically)."""
    tmp = dest.with_name(dest.name + ".part")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    tmp.replace(dest)


ZSTD_MAGIC = 0xFD2FB528


def frames(data: bytes) -> list[bytes]:
    """Split concatenated zstd frames (the segments) without decompressing them."""
    found, offset = [], 0
    while offset < len(data):
        start = offset
        magic = int.from_bytes(data[offset:offset + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: 4-byte size follows
            offset += 8 + int.from_bytes(data[offset + 4:offset + 8], "little")
            continue
        if magic != ZSTD_MAGIC:
            raise CaptainError(f"no zstd frame at byte {offset}")
        descriptor = data[offset + 4]
        single = bool(descriptor & 0x20)
        fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        offset += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
        last = False
        while not last:
            if offset + 3 > len(data):
                raise CaptainError(f"the zstd frame at byte {start} is truncated")
            header = int.from_bytes(data[offset:offset + 3], "little")
            last, kind, size = bool(header & 1), (header >> 1) & 3, header >> 3
            offset += 3 + (1 if kind == 1 else size)
        offset += 4 if descriptor & 0x04 else 0
        if offset > len(data):
            raise CaptainError(f"the zstd frame at byte {start} is truncated")
        found.append(data[start:offset])
    return found
