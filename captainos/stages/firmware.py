"""Firmware for the kernel's drivers, from Debian's non-free-firmware packages.

The kernel entry says which files its drivers may ask for: `modinfo -F firmware` of every
shipped module and the `firmware=` fields of modules.builtin.modinfo for built-in drivers.
kernel/firmware.txt names the Debian packages to take them from and the declared files
left out on purpose. Each file is stored as `<name>.xz` (CRC32 check, the only check the
kernel's XZ loader verifies besides none), under its declared name: a link in the package
is followed, so the image holds no links and no file no driver asks for.

The result is a cache entry holding `tree/usr/lib/firmware/...` (an extra tree of the image)
and `firmware.json` (every file with its driver, package and sizes; every skipped file with
its reason), which the image also ships as /usr/share/captainos/firmware.json. The tree also
carries each package's copyright file (COPYRIGHTS), which the image build reads for the
SBOM's licenses and does not ship.
"""

from __future__ import annotations

import fnmatch
import json
import lzma
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captainos.core import cache, log
from captainos.core.config import REPO, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import debian
from captainos.stages import kernel, kernel_config

LIST = REPO / "kernel" / "firmware.txt"
COMPONENT = "non-free-firmware"
TARGET = Path("usr/lib/firmware")
REPORT = Path("usr/share/captainos/firmware.json")
# Each package's copyright file, for the SBOM's licenses: mkosi.postinst.chroot reads them into
# licenses.tsv beside the installed packages' and removes the directory.
COPYRIGHTS = Path("usr/share/captainos/firmware-copyright")
# Where Debian's firmware packages put their files (trixie: usr/lib; older ones: lib).
PACKAGE_ROOTS = ("usr/lib/firmware", "lib/firmware")
MAX_DICT = 64 << 20


@dataclass(frozen=True)
class Skip:
    pattern: str
    reason: str


@dataclass(frozen=True)
class FirmwareList:
    packages: tuple[str, ...]
    skips: tuple[Skip, ...] = field(default=())

    def skip_reason(self, name: str) -> str | None:
        return next((s.reason for s in self.skips if fnmatch.fnmatchcase(name, s.pattern)), None)


def read_list(path: Path = LIST) -> FirmwareList:
    """Parse kernel/firmware.txt; a line of another form is an error naming its number."""
    packages: list[str] = []
    skips: list[Skip] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "package" and len(words) == 2:
            packages.append(words[1])
        elif words[0] == "skip" and len(words) >= 3:
            skips.append(Skip(words[1], " ".join(words[2:])))
        else:
            raise CaptainError(f"{path}:{number}: expected 'package NAME' or 'skip GLOB REASON', got {raw.strip()!r}")
    return FirmwareList(tuple(packages), tuple(skips))


def builtin_firmware(modinfo: bytes) -> dict[str, list[str]]:
    """module -> firmware names from modules.builtin.modinfo (NUL-separated module.key=value)."""
    found: dict[str, list[str]] = {}
    for record in modinfo.split(b"\0"):
        key, sep, value = record.decode(errors="replace").partition("=")
        module, dot, attr = key.partition(".")
        if sep and dot and attr == "firmware" and value:
            found.setdefault(module, []).append(value)
    return found


def declared(runner: Runner, kernel_entry: Path) -> dict[str, list[str]]:
    """module -> the firmware names it declares, for every module and built-in driver of the entry."""
    release = kernel.release(kernel_entry)
    mods = kernel_entry / "modules" / "usr" / "lib" / "modules" / release
    found: dict[str, list[str]] = {}
    builtin = mods / "modules.builtin.modinfo"
    if builtin.is_file():
        found.update(builtin_firmware(builtin.read_bytes()))
    for ko in sorted(mods.rglob("*.ko*")):
        names = runner.run(["modinfo", "-F", "firmware", ko], capture=True).stdout.split()
        if names:
            found[kernel_config.module_name(ko.name)] = names
    return found


def tree_file(root: Path, relative: str) -> Path | None:
    """The regular file a package tree holds at a path, links followed inside the tree."""
    path = root / relative
    for _ in range(16):  # a link chain longer than this is a loop
        if not path.is_symlink():
            break
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    if path.is_file() and not path.is_symlink():
        real = path.resolve()
        if real.is_relative_to(root.resolve()):
            return real
    return None


def package_file(root: Path, name: str) -> Path | None:
    """The regular file a package tree holds at a firmware name (trixie's root or the older one)."""
    return next((found for base in PACKAGE_ROOTS if (found := tree_file(root, f"{base}/{name}")) is not None), None)


def compress(data: bytes) -> bytes:
    """XZ with a CRC32 check and a dictionary no larger than the file (what the kernel allocates)."""
    dict_size = max(4096, min(len(data), MAX_DICT))
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": dict_size}])


def select(wanted: dict[str, list[str]], trees: dict[str, Path], fwlist: FirmwareList
           ) -> tuple[dict[str, tuple[str, Path, list[str]]], dict[str, tuple[str, list[str]]]]:
    """(name -> (package, file, drivers), skipped name -> (reason, drivers)); a declared
    file that no package ships and no skip line names is an error listing every such file."""
    drivers: dict[str, list[str]] = {}
    for module, names in sorted(wanted.items()):
        for name in names:
            drivers.setdefault(name, []).append(module)
    chosen: dict[str, tuple[str, Path, list[str]]] = {}
    skipped: dict[str, tuple[str, list[str]]] = {}
    missing: list[str] = []
    for name, mods in sorted(drivers.items()):
        if (reason := fwlist.skip_reason(name)) is not None:
            skipped[name] = (reason, mods)
            continue
        hit = next(((pkg, path) for pkg, root in trees.items() if (path := package_file(root, name))), None)
        if hit is None:
            missing.append(f"{name} ({', '.join(mods)})")
        else:
            chosen[name] = (hit[0], hit[1], mods)
    if missing:
        raise CaptainError(f"{len(missing)} firmware file(s) declared by shipped drivers are in none of "
                           f"{', '.join(trees) or 'no packages'}: {'; '.join(missing)}",
                           f"add the package that ships them, or a 'skip' line with the reason, to {LIST}")
    return chosen, skipped


def stale_skips(names: Iterable[str], fwlist: FirmwareList) -> list[str]:
    """Skip patterns that match no declared file (kept: another kernel may declare them)."""
    names = list(names)
    return [s.pattern for s in fwlist.skips if not any(fnmatch.fnmatchcase(n, s.pattern) for n in names)]


def install(chosen: dict[str, tuple[str, Path, list[str]]], tree: Path) -> list[dict[str, Any]]:
    """Write every chosen file as <name>.xz under tree/usr/lib/firmware; return their records."""
    records = []
    for name, (package, path, mods) in sorted(chosen.items()):
        data = path.read_bytes()
        packed = compress(data)
        cache.atomic_write(tree / TARGET / f"{name}.xz", packed)
        records.append({"name": name, "drivers": mods, "package": package, "bytes": len(data),
                        "xz_bytes": len(packed)})
    return records


def inputs(kernel_entry: Path, fwlist: FirmwareList, packages: list[debian.Package],
           wanted: dict[str, list[str]]) -> dict[str, Any]:
    return {"kernel": kernel_entry.name, "declared": wanted,
            "packages": [[p.name, p.version, p.sha256] for p in packages],
            "skips": [[s.pattern, s.reason] for s in fwlist.skips], "code": cache.code_digest(__file__)}


def build(cfg: Config, runner: Runner, kernel_entry: Path, archive: debian.Archive | None = None,
          fwlist_path: Path = LIST) -> Path:
    """The firmware entry for this kernel entry: tree/ (an extra tree) and firmware.json."""
    fwlist = read_list(fwlist_path)
    wanted = declared(runner, kernel_entry)
    names = sorted({n for ns in wanted.values() for n in ns})
    source = archive or debian.Archive(cfg.cache_dir, component=COMPONENT)
    # Debian's architecture names are ours; firmware packages are Architecture: all.
    packages = [source.package(name, cfg.arch.value) for name in fwlist.packages] if names else []
    for pattern in stale_skips(names, fwlist):
        log.warn(f"firmware skip {pattern!r} in {fwlist_path.name} matches no file this kernel's drivers declare")

    def produce(work: Path) -> None:
        unpacked = work / ".packages"
        trees = {}
        for pkg in packages:
            debian.extract(runner, source.fetch(pkg), unpacked / pkg.name)
            trees[pkg.name] = unpacked / pkg.name
        chosen, skipped = select(wanted, trees, fwlist)
        records = install(chosen, work / "tree")
        for pkg in packages:
            copyright_file = tree_file(trees[pkg.name], f"usr/share/doc/{pkg.name}/copyright")
            if copyright_file is not None:
                cache.atomic_write(work / "tree" / COPYRIGHTS / pkg.name, copyright_file.read_bytes())
        report = {"kernel_entry": kernel_entry.name,
                  "packages": {p.name: p.version for p in packages},
                  "files": records,
                  "skipped": [{"name": n, "reason": r, "drivers": m} for n, (r, m) in sorted(skipped.items())]}
        text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        cache.atomic_write(work / "firmware.json", text)
        cache.atomic_write(work / "tree" / REPORT, text)
        cache.remove(unpacked)
        total = sum(r["xz_bytes"] for r in records)
        log.info(f"    firmware: {len(records)} files, {log.human_bytes(total)} as xz; "
                 f"{len(skipped)} declared files skipped (reasons in {fwlist_path.name})")

    return cache.cached(cfg.cache_dir, "firmware", cfg.arch.value,
                        inputs(kernel_entry, fwlist, packages, wanted), force=cfg.force("initramfs"), produce=produce)
