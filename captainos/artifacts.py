"""The files in out/: original names, Smee's default names, and sha256sums-<arch>.txt."""

from __future__ import annotations

import os
from pathlib import Path

from captainos import cache, log
from captainos.config import Arch
from captainos.errors import CaptainError


def initramfs_name(arch: Arch) -> str:
    return f"initramfs-{arch.value}.cpio.zst"


def vmlinuz_name(arch: Arch) -> str:
    return f"vmlinuz-{arch.value}"


def iso_name(arch: Arch) -> str:
    return f"captainos-{arch.value}.iso"


def checksums_name(arch: Arch) -> str:
    return f"sha256sums-{arch.value}.txt"


def smee_links(arch: Arch) -> dict[str, str]:
    """Smee's default download names, pointing at our original names."""
    return {
        f"vmlinuz-{arch.smee_name()}": vmlinuz_name(arch),
        f"initramfs-{arch.smee_name()}": initramfs_name(arch),
    }


def publish(out_dir: Path, src: Path, name: str) -> Path:
    """Copy a stage result into out/ atomically."""
    dst = out_dir / name
    cache.atomic_copy(src, dst)
    log.info(f"    {dst} ({log.human_bytes(dst.stat().st_size)})")
    return dst


def link_smee_names(out_dir: Path, arch: Arch) -> None:
    for link, target in smee_links(arch).items():
        path = out_dir / link
        if not (out_dir / target).exists():
            continue
        tmp = cache.temp_beside(path)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, path)


def checksum_targets(out_dir: Path, arch: Arch) -> list[str]:
    """The artifacts of one arch that exist in out/, in a stable order."""
    names = [vmlinuz_name(arch), initramfs_name(arch), iso_name(arch)]
    return [n for n in names if (out_dir / n).is_file()]


def write_checksums(out_dir: Path, arch: Arch) -> Path:
    names = checksum_targets(out_dir, arch)
    if not names:
        raise CaptainError(f"no artifacts for {arch.value} in {out_dir}", "run './build.py' first")
    lines = "".join(f"{cache.sha256_file(out_dir / n)}  {n}\n" for n in names)
    path = out_dir / checksums_name(arch)
    cache.atomic_write(path, lines)
    log.info(f"    {path}: {len(names)} files")
    return path


def verify_checksums(out_dir: Path, arch: Arch) -> list[str]:
    """Check every line of sha256sums-<arch>.txt; raise naming the first mismatch."""
    path = out_dir / checksums_name(arch)
    if not path.is_file():
        raise CaptainError(f"{path} does not exist", "run './build.py checksums' to write it")
    checked = []
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise CaptainError(f"{path}: not a sha256sum file (byte {exc.start} is not ASCII)",
                           "run './build.py checksums' to rewrite it") from None
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name:
            raise CaptainError(f"{path}:{number}: malformed line")
        target = out_dir / name
        if not target.is_file():
            raise CaptainError(f"{name} is listed in {path.name} but missing")
        if cache.sha256_file(target) != digest:
            raise CaptainError(f"checksum mismatch for {name}",
                               "rebuild it, or rewrite the sums with './build.py checksums'")
        checked.append(name)
    return checked
