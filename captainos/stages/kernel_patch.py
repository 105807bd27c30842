"""The kernel tree's patches: what a config fragment cannot set (COMMAND_LINE_SIZE, the
default of INIT_ENV_ARG_LIMIT, the default of initramfs_options=), each applied to the copy
in build/ before the compile and failing loudly when the kernel moved what it patches."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from captainos.core import cache, log
from captainos.core.config import Arch
from captainos.core.errors import CaptainError

COMMAND_LINE_SIZE = 4096  # Smee's ISO patcher writes command lines longer than 2048 bytes
# Linux hands /init every unknown "name=value" word as an environment variable and panics at
# boot ("Too many boot env vars") at the 32nd with CONFIG_INIT_ENV_ARG_LIMIT 32 (measured on
# Debian's 6.12). The symbol has no prompt, so a config fragment cannot set it: the default
# in init/Kconfig is patched instead.
INIT_ENV_ARG_LIMIT = 128
_INIT_ENV_DEFAULT = re.compile(r"^(config INIT_ENV_ARG_LIMIT\n(?:[ \t].*\n|\n)*?[ \t]+default[ \t]+)([0-9]+)"
                               r"([ \t]+if[ \t]+!UML)$", re.MULTILINE)
# The kernel unpacks the initramfs into a tmpfs capped at half the RAM, so a 384 MiB machine
# cannot hold our ~195 MB root ("Initramfs unpacking failed: write error", then a root with
# files missing). Linux 6.18's initramfs_options= (also in Debian's 6.12.117 source) gives the
# rootfs mount options; its default is patched, so a compiled kernel needs no parameter. An
# initramfs_options= on the command line still wins, and /init sizes the root afterwards.
INITRAMFS_OPTIONS = "size=90%"
_INITRAMFS_OPTIONS = re.compile(r"^(static char \* __initdata initramfs_options)( = \"[^\"\n]*\")?;$", re.MULTILINE)
# Where each architecture defines COMMAND_LINE_SIZE (the first file that defines it wins).
_SETUP_H = {
    Arch.AMD64: ("arch/x86/include/asm/setup.h", "arch/x86/include/uapi/asm/setup.h"),
    Arch.ARM64: ("arch/arm64/include/uapi/asm/setup.h",),
}


def patch_command_line_size(tree: Path, arch: Arch, size: int = COMMAND_LINE_SIZE) -> Path:
    """Set `#define COMMAND_LINE_SIZE <size>` in the tree; fail loudly if the line is not there."""
    pattern = re.compile(r"^(#define[ \t]+COMMAND_LINE_SIZE[ \t]+)([0-9]+)[ \t]*$", re.MULTILINE)
    for rel in _SETUP_H[arch]:
        header = tree / rel
        if not header.is_file():
            continue
        text = header.read_text()
        found = pattern.findall(text)
        if len(found) > 1:
            raise CaptainError(f"{header} defines COMMAND_LINE_SIZE {len(found)} times",
                               "update stages/kernel_patch.py")
        if found:
            if int(found[0][1]) != size:
                cache.atomic_write(header, pattern.sub(rf"\g<1>{size}", text))
                log.info(f"    patched COMMAND_LINE_SIZE {found[0][1]} -> {size} in {rel}")
            return header
    raise CaptainError(f"no '#define COMMAND_LINE_SIZE' in {' or '.join(_SETUP_H[arch])} of {tree}",
                       "the kernel moved it; update kernel_patch._SETUP_H")


def patch_init_env_limit(tree: Path, limit: int = INIT_ENV_ARG_LIMIT) -> Path:
    """Set the non-UML default of INIT_ENV_ARG_LIMIT in init/Kconfig; fail loudly if it moved."""
    kconfig = tree / "init" / "Kconfig"
    text = kconfig.read_text() if kconfig.is_file() else ""
    found = _INIT_ENV_DEFAULT.findall(text)
    if len(found) != 1:
        raise CaptainError(f"{kconfig}: {len(found)} non-UML defaults of INIT_ENV_ARG_LIMIT, expected 1",
                           "the kernel changed it; update kernel_patch.patch_init_env_limit")
    if int(found[0][1]) != limit:
        cache.atomic_write(kconfig, _INIT_ENV_DEFAULT.sub(rf"\g<1>{limit}\g<3>", text))
        log.info(f"    patched INIT_ENV_ARG_LIMIT {found[0][1]} -> {limit} in init/Kconfig")
    return kconfig


def patch_initramfs_options(tree: Path, options: str = INITRAMFS_OPTIONS) -> bool:
    """Make `options` the default of initramfs_options= in fs/namespace.c. False (and a warning)
    for a kernel without the parameter: its root tmpfs stays capped at half the RAM while the
    initramfs unpacks."""
    source = tree / "fs" / "namespace.c"
    text = source.read_text() if source.is_file() else ""
    found = _INITRAMFS_OPTIONS.findall(text)
    if len(found) != 1:
        log.warn(f"{source.relative_to(tree)} has no initramfs_options (Linux >= 6.18 or a 6.12 stable "
                    "backport): the initramfs unpacks into a tmpfs of half the RAM (machines under ~420 MiB fail)")
        return False
    wanted = f'\\g<1> = "{options}";'
    patched = _INITRAMFS_OPTIONS.sub(wanted, text)
    if patched != text:
        cache.atomic_write(source, patched)
        log.info(f"    patched the default of initramfs_options= to {options} in fs/namespace.c")
    return True


def bzimage_cmdline_size(image: Path) -> int:
    """cmdline_size from an x86 bzImage setup header (boot protocol >= 2.06): COMMAND_LINE_SIZE - 1."""
    with image.open("rb") as handle:
        handle.seek(0x202)
        if handle.read(4) != b"HdrS":
            raise CaptainError(f"{image} is not an x86 bzImage")
        handle.seek(0x238)
        return int(struct.unpack("<I", handle.read(4))[0])
