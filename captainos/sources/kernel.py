"""Where a kernel comes from: choosing the source, identifying it, and unpacking its tree.

Three of the four sources (config.KernelSource) give a tree to compile, each verified before use:
- local:         a kernel tree (KERNEL_SRC), copied so it is never modified;
- kernel-org:    the release tarball, checked against pins.KERNEL_ORG_SHA256 (the default
                 version is pinned) or, for another version, kernel.org's sha256sums.asc;
- debian-source: Debian's linux-source-<series> package (archive signatures, see debian.py).
The fourth, debian-image, is Debian's signed prebuilt image: resolve() identifies its package
and the kernel stage unpacks it (nothing compiled).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import Config, KernelSource
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, run
from captainos.sources import debian, fetch

PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Source:
    """A resolved, not yet fetched kernel source."""

    kind: KernelSource  # never AUTO
    version: str  # upstream version, e.g. 6.12.117
    identity: str  # sha256 of the tarball/.deb, or git:/mtime: digest of a local tree
    url: str = ""
    path: Path | None = None
    package: debian.Package | None = field(default=None, compare=False)


def series(version: str) -> str:
    """6.12.69 -> 6.12"""
    return ".".join(version.split(".")[:2])


def probe_kernel_org(url: str = pins.KERNEL_ORG_MIRROR, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when url answers within timeout, else the reason it did not."""
    failure = fetch.probe(url + "/", timeout=timeout)
    return None if failure is None else f"{url} did not answer within {timeout:.0f}s ({failure})"


def select_source(cfg: Config, probe: Callable[[], str | None] = probe_kernel_org) -> tuple[KernelSource, str]:
    """The source to use and, for auto, the reason in a few words."""
    if cfg.kernel_source is not KernelSource.AUTO:
        return cfg.kernel_source, "requested"
    if cfg.kernel_src is not None:
        return KernelSource.LOCAL, "KERNEL_SRC is set"
    failure = probe()
    if failure is None:
        return KernelSource.KERNEL_ORG, "cdn.kernel.org answers"
    return KernelSource.DEBIAN_SOURCE, failure


def tree_version(path: Path) -> str:
    """The version of a kernel tree from its Makefile, or a clear error if it is not one."""
    makefile = path / "Makefile"
    if not (path.is_dir() and makefile.is_file() and (path / "Kconfig").is_file() and (path / "arch").is_dir()):
        raise CaptainError(f"KERNEL_SRC {path} does not look like a kernel tree",
                           "it needs a top-level Makefile with VERSION =, Kconfig and arch/")
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = ([0-9]+)$", makefile.read_text(errors="replace"),
                             re.MULTILINE))
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        raise CaptainError(f"KERNEL_SRC {path} has no VERSION/PATCHLEVEL in its Makefile",
                           "point KERNEL_SRC at the top of a Linux source tree")
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields.get('SUBLEVEL', '0')}"


def local_identity(path: Path) -> str:
    """For a git checkout: HEAD plus a digest of every changed, deleted or untracked file's
    content (git status). Otherwise: a digest of every file's path, size and mtime (.git excluded)."""
    if (path / ".git").exists() and shutil.which("git"):
        try:
            head = run(["git", "-C", path, "rev-parse", "HEAD"], capture=True).stdout.strip()
            status = run(["git", "-C", path, "status", "--porcelain=v1", "-z", "--no-renames",
                          "--untracked-files=all"], capture=True).stdout
        except CaptainError:
            pass  # not a usable checkout (no commit yet...): fall through to the mtime digest
        else:
            dirty = hashlib.sha256()
            for item in sorted(i for i in status.split("\0") if i):
                changed = path / item[3:]  # "XY <path>"
                dirty.update(f"{item}\0{cache.sha256_file(changed) if changed.is_file() else '-'}\n".encode())
            return f"git:{head}+{dirty.hexdigest()[:16]}"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(str(path)):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.lstat(full)
            digest.update(f"{os.path.relpath(full, str(path))}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"mtime:{digest.hexdigest()[:32]}"


def kernel_org_url(version: str, base: str = pins.KERNEL_ORG_MIRROR) -> str:
    return f"{base}/v{version.split('.')[0]}.x/linux-{version}.tar.xz"


def kernel_org_sha256(version: str, cache_dir: Path, base: str = pins.KERNEL_ORG_MIRROR) -> str:
    """The expected sha256 of linux-<version>.tar.xz: the pin, else kernel.org's published list."""
    if version in pins.KERNEL_ORG_SHA256:
        return pins.KERNEL_ORG_SHA256[version]
    sums_url = f"{base}/v{version.split('.')[0]}.x/sha256sums.asc"
    sums = fetch.get(sums_url, cache_dir / "kernel-org" / f"sha256sums-v{version.split('.')[0]}.asc")
    name = f"linux-{version}.tar.xz"
    found = fetch.parse_sha256sums(sums.read_text(errors="replace")).get(name)
    if found is None:
        raise CaptainError(f"unknown kernel version {version}: {name} is not listed in {sums_url}",
                           "choose a released version (see https://kernel.org)")
    log.warn(f"{name} has no sha256 in pins.py: checked against {sums_url}, from the same server "
             "(pin it in KERNEL_ORG_SHA256)")
    return found


def resolve(cfg: Config, kind: KernelSource, archive: debian.Archive | None = None,
            base: str = pins.KERNEL_ORG_MIRROR) -> Source:
    """Identify the source (digests, versions) without fetching it."""
    if kind is KernelSource.LOCAL:
        if cfg.kernel_src is None:
            raise CaptainError("kernel source 'local' needs KERNEL_SRC", "set KERNEL_SRC=<path to a kernel tree>")
        path = cfg.kernel_src.resolve()
        return Source(kind, tree_version(path), local_identity(path), path=path)
    if kind is KernelSource.KERNEL_ORG:
        return Source(kind, cfg.kernel_version, kernel_org_sha256(cfg.kernel_version, cfg.cache_dir, base),
                      url=kernel_org_url(cfg.kernel_version, base))
    archive = archive or debian.Archive(cfg.cache_dir)
    if kind is KernelSource.DEBIAN_SOURCE:
        pkg = archive.package(f"linux-source-{series(cfg.kernel_version)}", cfg.arch.value)
    else:
        meta = archive.package(f"linux-image-{cfg.arch.value}", cfg.arch.value)
        images = [d for d in meta.depends if d.startswith("linux-image-")]
        if not images:
            raise CaptainError(f"{meta.name} {meta.version} depends on no linux-image package")
        pkg = archive.package(images[0], cfg.arch.value)
    return Source(kind, pkg.version.split("-")[0], pkg.sha256, url=f"{archive.mirror}/{pkg.filename}",
                  package=pkg)


def prepare_tree(runner: Runner, source: Source, tree: Path, cache_dir: Path) -> None:
    """Put the source into `tree` (once per source identity); nothing trusted until complete."""
    stamp = tree / ".captainos-source"
    if stamp.is_file() and stamp.read_text().strip() == source.identity:
        return
    cache.remove(tree)
    partial = tree.with_name(tree.name + ".partial")
    cache.remove(partial)
    partial.mkdir(parents=True)
    if source.kind is KernelSource.LOCAL:
        assert source.path is not None
        log.info(f"    copying {source.path} (without .git) to {tree}")
        shutil.copytree(source.path, partial / "linux", symlinks=True, ignore=shutil.ignore_patterns(".git"))
        if (partial / "linux" / ".config").exists():
            runner.run(["make", "-C", partial / "linux", "mrproper"], capture=True)
    elif source.kind is KernelSource.KERNEL_ORG:
        tarball = debian.fetch_verified(source.url, source.identity, cache_dir)
        runner.run(["tar", "-xf", tarball, "-C", partial])
    else:
        assert source.package is not None
        deb = debian.fetch_verified(source.url, source.identity, cache_dir)
        debian.extract(runner, deb, partial / "deb")
        tarballs = sorted((partial / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise CaptainError(f"{deb.name} holds {len(tarballs)} source tarballs, expected one")
        runner.run(["tar", "-xf", tarballs[0], "-C", partial])
        cache.remove(partial / "deb")
    tops = [p for p in partial.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise CaptainError(f"the {source.kind.value} source unpacked into {len(tops)} directories, expected one")
    tree_version(tops[0])  # still a kernel tree?
    os.rename(tops[0], tree)
    cache.remove(partial)
    stamp.write_text(source.identity + "\n")

