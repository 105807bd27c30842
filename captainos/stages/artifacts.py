"""The files in out/: original names, Smee's default names, versioned names and the sums.

Each artifact is a regular file under its original name (`vmlinuz-amd64`); Smee's default
names (`vmlinuz-x86_64`) and the versioned names (`vmlinuz-<kernel release>-x86_64`) are
relative symlinks to it. A versioned link carries the release of the kernel the artifact was
built with, so an initramfs left from an older kernel never appears under the new kernel's
name. `sha256sums-<arch>.txt` lists every one of these names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from captainos.core import cache, log
from captainos.core.config import Arch
from captainos.core.errors import CaptainError


def initramfs_name(arch: Arch) -> str:
    return f"initramfs-{arch.value}.cpio.zst"


def vmlinuz_name(arch: Arch) -> str:
    return f"vmlinuz-{arch.value}"


def iso_name(arch: Arch) -> str:
    return f"captainos-{arch.value}.iso"


def signature_name(arch: Arch) -> str:
    """cosign's signature of the sums (publish --sign-key)."""
    return f"{checksums_name(arch)}.sig"


def lock_name(arch: Arch) -> str:
    return f"packages-{arch.value}.lock"


def sbom_name(arch: Arch) -> str:
    return f"sbom-{arch.value}.spdx.json"


def checksums_name(arch: Arch) -> str:
    return f"sha256sums-{arch.value}.txt"


def versioned_name(name: str, arch: Arch, release: str) -> str:
    """An original name with the kernel release in it and the architecture as Smee names it:
    vmlinuz-amd64 -> vmlinuz-<release>-x86_64, captainos-arm64.iso -> captainos-<release>-aarch64.iso.
    Smee appends -x86_64/-aarch64 to the kernel and initrd names the Helm chart sets
    (ipxeHttpScriptKernelName=vmlinuz-<release>), so these are the names it asks for."""
    head, sep, tail = name.partition(f"-{arch.value}")
    if not sep or not head:
        raise CaptainError(f"{name} does not carry the architecture {arch.value}")
    if tail.startswith(".cpio"):  # initramfs-<release>-<arch>: what Smee asks for, no suffix
        tail = ""
    return f"{head}-{release}-{arch.smee_name()}{tail}"


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
        if (out_dir / target).exists():
            _replace_link(out_dir / link, target)


def _replace_link(path: Path, target: str) -> None:
    tmp = cache.temp_beside(path)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def links_to(out_dir: Path, target: str) -> list[str]:
    """The names in out/ that are symlinks to target (Smee's and the versioned names), sorted."""
    return sorted(p.name for p in out_dir.iterdir() if p.is_symlink() and os.readlink(p) == target)


def _versioned_pattern(name: str, arch: Arch) -> re.Pattern[str]:
    head, tail = versioned_name(name, arch, "\x00").split("\x00")
    return re.compile(f"{re.escape(head)}(.+){re.escape(tail)}$")


def link_versioned(out_dir: Path, arch: Arch, name: str, release: str) -> None:
    """out/<versioned name> -> name; a link of another release to the same name is removed (it
    would now name a file built from another kernel)."""
    current = versioned_name(name, arch, release)
    pattern = _versioned_pattern(name, arch)
    for other in links_to(out_dir, name):
        if other != current and pattern.match(other):
            (out_dir / other).unlink()
    _replace_link(out_dir / current, name)


def releases(out_dir: Path, arch: Arch) -> dict[str, str]:
    """original name -> the kernel release its versioned link names, for the artifacts that have one."""
    found = {}
    for name in checksum_targets(out_dir, arch):
        pattern = _versioned_pattern(name, arch)
        for link in links_to(out_dir, name):
            if match := pattern.match(link):
                found[name] = match.group(1)
    return found


def release_of(out_dir: Path, arch: Arch) -> str | None:
    """The one kernel release of out/'s artifacts for arch (None before versioned names
    existed); an error when they come from different kernels."""
    found = releases(out_dir, arch)
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{name} from {release}" for name, release in sorted(found.items()))
        raise CaptainError(f"out/ mixes kernels for {arch.value}: {listing}",
                           "rebuild the stages after the kernel: './build.py'")
    return next(iter(found.values()), None)


def checksum_targets(out_dir: Path, arch: Arch) -> list[str]:
    """The artifacts of one arch that exist in out/, in a stable order."""
    names = [vmlinuz_name(arch), initramfs_name(arch), sbom_name(arch), lock_name(arch), iso_name(arch)]
    return [n for n in names if (out_dir / n).is_file()]


def checksum_names(out_dir: Path, arch: Arch) -> list[str]:
    """Every name of every artifact: each original followed by the links to it."""
    return [name for target in checksum_targets(out_dir, arch) for name in [target, *links_to(out_dir, target)]]


def write_checksums(out_dir: Path, arch: Arch) -> Path:
    """sha256sums-<arch>.txt over every name (and sha256sums-<release>-<arch>.txt linked to it)."""
    targets = checksum_targets(out_dir, arch)
    if not targets:
        raise CaptainError(f"no artifacts for {arch.value} in {out_dir}", "run './build.py' first")
    release = release_of(out_dir, arch)
    digests = {target: cache.sha256_file(out_dir / target) for target in targets}
    names = checksum_names(out_dir, arch)
    lines = "".join(f"{digests[os.readlink(out_dir / n) if (out_dir / n).is_symlink() else n]}  {n}\n"
                    for n in names)
    path = out_dir / checksums_name(arch)
    signature = out_dir / signature_name(arch)
    for stale in [signature, *(out_dir / link for link in links_to(out_dir, signature.name))]:
        stale.unlink(missing_ok=True)  # it signed the sums being replaced
    cache.atomic_write(path, lines)
    if release is not None:
        link_versioned(out_dir, arch, path.name, release)
    log.info(f"    {path}: {len(names)} names of {len(targets)} files")
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
