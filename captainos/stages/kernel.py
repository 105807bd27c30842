"""kernel stage: vmlinuz, its config and its modules for one architecture.

Four sources (config.KernelSource), every one verified before use:
- local:         a kernel tree (KERNEL_SRC), copied into build/ so it is never modified;
- kernel-org:    the release tarball, checked against pins.KERNEL_ORG_SHA256 (the default
                 version is pinned) or, for another version, kernel.org's sha256sums.asc;
- debian-source: Debian's linux-source-<series> package (archive signatures, see debian.py);
- debian-image:  Debian's signed prebuilt image, nothing compiled, modules trimmed to
                 kernel/debian-modules.txt plus their dependencies.
The first three are compiled with kernel/configs/<series>/{common,<arch>}.config merged over
`make allnoconfig` (docs/decisions/kernel-source.md says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captainos.core import cache, log, pins
from captainos.core.config import REPO, Arch, Config, KernelSource
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, run
from captainos.sources import debian, fetch

KERNEL_DIR = REPO / "kernel"
CONFIG_ROOT = KERNEL_DIR / "configs"
REQUIRED = KERNEL_DIR / "required.txt"
DEBIAN_MODULES = KERNEL_DIR / "debian-modules.txt"
# What kbuild would otherwise take from the clock and from a counter in the object dir (the
# "#N SMP PREEMPT_DYNAMIC <date>" in the version string): fixed, so that a compile gives the
# same vmlinuz in a fresh object dir, an incremental one, today and next week.
KBUILD_REPRODUCIBLE = {"KBUILD_BUILD_TIMESTAMP": time.strftime("%a %b %d %H:%M:%S UTC %Y",
                                                              time.gmtime(pins.SOURCE_DATE_EPOCH)),
                       "KBUILD_BUILD_VERSION": "1", "KBUILD_BUILD_USER": "captainos",
                       "KBUILD_BUILD_HOST": "captainos"}
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
PROBE_TIMEOUT = 3.0
_VERSION = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
# Where each architecture defines COMMAND_LINE_SIZE (the first file that defines it wins).
_SETUP_H = {
    Arch.AMD64: ("arch/x86/include/asm/setup.h", "arch/x86/include/uapi/asm/setup.h"),
    Arch.ARM64: ("arch/arm64/include/uapi/asm/setup.h",),
}


# --- sources -----------------------------------------------------------------------------

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


def available_series(arch: Arch) -> list[str]:
    found = [d.name for d in CONFIG_ROOT.iterdir() if (d / f"{arch.value}.config").is_file()] \
        if CONFIG_ROOT.is_dir() else []
    return sorted(found, key=lambda s: tuple(int(p) for p in s.split(".")))


def config_fragments(kseries: str, arch: Arch, root: Path = CONFIG_ROOT) -> list[Path]:
    """common.config (when present) then <arch>.config of one series, or a clear error."""
    arch_file = root / kseries / f"{arch.value}.config"
    if not arch_file.is_file():
        have = ", ".join(available_series(arch)) if root == CONFIG_ROOT else "?"
        raise CaptainError(f"no config for {kseries} on {arch.value}; available: {have or 'none'}",
                           f"add {arch_file.relative_to(REPO) if root == CONFIG_ROOT else arch_file}")
    common = root / kseries / "common.config"
    return ([common] if common.is_file() else []) + [arch_file]


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


# --- configuration -----------------------------------------------------------------------

def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('y', 'm', '"str"', '123'); '# CONFIG_X is not set' -> 'n'."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"^(CONFIG_\w+)=(.*)$", line):
            values[m[1]] = m[2]
        elif m := re.match(r"^# (CONFIG_\w+) is not set$", line):
            values[m[1]] = "n"
    return values


def merge_fragments(paths: Sequence[Path]) -> str:
    """The fragments concatenated, later files winning (Kconfig reads the last value)."""
    return "".join(f"# --- {p.parent.name}/{p.name}\n{p.read_text()}\n" for p in paths)


def fragment_mismatches(fragment: str, resolved: dict[str, str]) -> list[str]:
    """Options the fragment sets that the resolved .config does not have (a missing dependency
    or a misspelt name). '=m' resolved as 'y' is fine: something built in selected it."""
    wanted = parse_config(fragment)
    out = []
    for option, value in wanted.items():
        got = resolved.get(option, "n")
        if got != value and not (value == "m" and got == "y"):
            out.append(f"{option}={value} (got {got})")
    return out


def make_argv(arch: Arch, target: str | Sequence[str], jobs: int, build_dir: Path,
              extra: Sequence[str] = ()) -> list[str]:
    """make for one target in the source tree (the cwd), objects in build_dir."""
    targets = [target] if isinstance(target, str) else list(target)
    argv = ["make", f"-j{jobs}", f"O={build_dir}", f"ARCH={arch.kernel_arch()}"]
    if arch.cross_compile():
        argv.append(f"CROSS_COMPILE={arch.cross_compile()}")
    return argv + list(extra) + targets


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
            raise CaptainError(f"{header} defines COMMAND_LINE_SIZE {len(found)} times", "update kernel.py's patch")
        if found:
            if int(found[0][1]) != size:
                cache.atomic_write(header, pattern.sub(rf"\g<1>{size}", text))
                log.info(f"    patched COMMAND_LINE_SIZE {found[0][1]} -> {size} in {rel}")
            return header
    raise CaptainError(f"no '#define COMMAND_LINE_SIZE' in {' or '.join(_SETUP_H[arch])} of {tree}",
                       "the kernel moved it; update kernel._SETUP_H")


def patch_init_env_limit(tree: Path, limit: int = INIT_ENV_ARG_LIMIT) -> Path:
    """Set the non-UML default of INIT_ENV_ARG_LIMIT in init/Kconfig; fail loudly if it moved."""
    kconfig = tree / "init" / "Kconfig"
    text = kconfig.read_text() if kconfig.is_file() else ""
    found = _INIT_ENV_DEFAULT.findall(text)
    if len(found) != 1:
        raise CaptainError(f"{kconfig}: {len(found)} non-UML defaults of INIT_ENV_ARG_LIMIT, expected 1",
                           "the kernel changed it; update kernel.patch_init_env_limit")
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


# --- required options and module sets ----------------------------------------------------

@dataclass(frozen=True)
class Requirement:
    option: str
    module: str | None  # the module that provides it when =m is acceptable


def read_required(path: Path = REQUIRED) -> list[Requirement]:
    """Lines 'CONFIG_X [module]'; '#' starts a comment."""
    reqs = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        words = raw.split("#")[0].split()
        if not words:
            continue
        if not re.match(r"^CONFIG_\w+$", words[0]) or len(words) > 2:
            raise CaptainError(f"{path}:{number}: expected 'CONFIG_NAME [module]', got {raw.strip()!r}")
        reqs.append(Requirement(words[0], words[1] if len(words) > 1 else None))
    return reqs


def module_name(path: str) -> str:
    """kernel/fs/overlayfs/overlay.ko.xz -> overlay; dashes and underscores are the same name."""
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")


def missing_options(reqs: Iterable[Requirement], resolved: dict[str, str],
                    modules: set[str] | None = None) -> list[str]:
    """Requirements the config does not meet; '=m' counts only when the module is in `modules`."""
    out = []
    for req in reqs:
        value = resolved.get(req.option, "n")
        if value == "y":
            continue
        if value == "m" and modules is not None and req.module and module_name(req.module) in modules:
            continue
        why = f"=m but module {req.module or '?'} is not kept" if value == "m" else "not set"
        out.append(f"{req.option} ({why})")
    return out


def check_required(config: Path, modules: set[str] | None = None, required: Path = REQUIRED) -> None:
    missing = missing_options(read_required(required), parse_config(config.read_text()), modules)
    if missing:
        raise CaptainError(f"kernel config {config} lacks options CaptainOS needs: {', '.join(missing)}",
                           f"enable them in kernel/configs (or kernel/debian-modules.txt); list: {required}")


def read_module_list(arch: Arch, path: Path = DEBIAN_MODULES) -> list[str]:
    """Module names of the list; a line starting with '<arch>:' counts for that arch only."""
    names = []
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if words and words[0].endswith(":"):
            if words[0][:-1] not in {a.value for a in Arch}:
                raise CaptainError(f"{path}: unknown architecture {words[0]!r}", "use amd64: or arm64:")
            if words[0][:-1] != arch.value:
                continue
            words = words[1:]
        names += [module_name(w) for w in words]
    return names


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, [dependency paths]) from modules.dep."""
    out = {}
    for line in text.splitlines():
        if ":" in line:
            path, _, deps = line.partition(":")
            out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """name -> soft dependency names (pre: and post:) from modules.softdep."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            out.setdefault(module_name(words[1]), []).extend(
                module_name(w) for w in words[2:] if w not in ("pre:", "post:"))
    return out


def module_closure(names: Iterable[str], modules_dep: str, softdep: str = "",
                   builtin: Iterable[str] = ()) -> list[str]:
    """Paths (relative to lib/modules/<kver>) of the named modules and everything they need.

    Built-in names are satisfied already; a name that is neither a module nor built in is an
    error. Soft dependencies are followed when they exist as modules.
    """
    deps = parse_modules_dep(modules_dep)
    soft = parse_softdeps(softdep)
    inside = {module_name(b) for b in builtin}
    unknown = sorted({module_name(n) for n in names} - deps.keys() - inside)
    if unknown:
        raise CaptainError(f"modules neither built nor built in: {', '.join(unknown)}",
                           f"fix {DEBIAN_MODULES.relative_to(REPO)}")
    keep: set[str] = set()
    todo = [module_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in keep or name not in deps:
            continue
        keep.add(name)
        todo.extend(module_name(p) for p in deps[name][1])
        todo.extend(s for s in soft.get(name, []) if s in deps)
    return sorted(deps[n][0] for n in keep)


# --- the stage ---------------------------------------------------------------------------

def build(cfg: Config, runner: Runner, *inputs: Path) -> Path:
    """The kernel entry (vmlinuz, config, kernel.json, modules/) for cfg.arch."""
    if not _VERSION.match(cfg.kernel_version):
        raise CaptainError(f"invalid KERNEL_VERSION {cfg.kernel_version!r}", "use a release like 6.12.69")
    kind, reason = select_source(cfg)
    if cfg.kernel_source is KernelSource.AUTO:
        log.info(f"    kernel source: {kind.value} ({reason})")
    if kind is KernelSource.DEBIAN_IMAGE:
        return _debian_image(cfg, runner, resolve(cfg, kind))
    wanted_series = series(tree_version(cfg.kernel_src.resolve())) if kind is KernelSource.LOCAL and cfg.kernel_src \
        else series(cfg.kernel_version)
    config_fragments(wanted_series, cfg.arch)  # fail before any download when there is no config
    source = resolve(cfg, kind)
    if kind is KernelSource.DEBIAN_SOURCE and source.version != cfg.kernel_version:
        log.info(f"    Debian {pins.DEBIAN_RELEASE} ships {source.version} (KERNEL_VERSION applies to kernel-org)")
    return _compiled(cfg, runner, source)


def _compiler(cfg: Config, runner: Runner) -> str:
    cc = f"{cfg.arch.cross_compile()}gcc"
    return f"{cc} " + runner.run([cc, "-dumpfullversion"], capture=True).stdout.strip()


def compile_parts(arch: Arch, source: Source, fragments: Sequence[Path], compiler: str) -> dict[str, Any]:
    """Every input of a compiled kernel: the cache key is a digest of this."""
    return {
        "code": cache.code_digest(__file__), "arch": arch.value, "source": source.kind.value, "version": source.version,
        "source_id": source.identity, "command_line_size": COMMAND_LINE_SIZE,
        "init_env_arg_limit": INIT_ENV_ARG_LIMIT, "initramfs_options": INITRAMFS_OPTIONS, "compiler": compiler,
        "fragments": {f"{p.parent.name}/{p.name}": cache.sha256_file(p) for p in fragments},
        "kbuild_env": KBUILD_REPRODUCIBLE,
    }


def _compiled(cfg: Config, runner: Runner, source: Source) -> Path:
    fragments = config_fragments(series(source.version), cfg.arch)
    parts = compile_parts(cfg.arch, source, fragments, _compiler(cfg, runner))
    entry = cache.cached(cfg.cache_dir, "kernel", cfg.arch.value, parts, force=cfg.force("kernel"),
                         produce=lambda work: _compile(cfg, runner, source, fragments, parts, work))
    check_required(entry / "config")
    return entry


def _work_dirs(cfg: Config) -> tuple[Path, Path, Path]:
    """(source tree, object tree, log directory: one <step>.log per make step)."""
    base = cfg.build_dir / "kernel"
    return base / "src", base / "obj", base / "logs"


def _prepare_tree(cfg: Config, runner: Runner, source: Source, tree: Path) -> None:
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
        tarball = debian.fetch_verified(source.url, source.identity, cfg.cache_dir)
        runner.run(["tar", "-xf", tarball, "-C", partial])
    else:
        assert source.package is not None
        deb = debian.fetch_verified(source.url, source.identity, cfg.cache_dir)
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


class _MakeProgress:
    """make's output condensed to one line: files compiled so far and the current one."""

    def __init__(self) -> None:
        self.count = 0
        self.progress = log.Progress("make", every=30.0)

    def __call__(self, line: str) -> None:
        if m := re.match(r"^\s+(CC|CC \[M\]|AS|AR|LD|LD \[M\])\s+(\S+)", line):
            self.count += m[1].startswith("CC")
            self.progress.update(self.count, f"{self.count} files compiled, {m[1]} {m[2]}")


def _make(runner: Runner, tree: Path, argv: list[str], log_file: Path, env: dict[str, str] | None = None) -> None:
    """Run make with its output in log_file and one progress line; on failure name the first error."""
    progress = _MakeProgress()
    try:
        runner.run(argv, cwd=tree, log_file=log_file, on_line=progress, env=env or {})
    except CaptainError as exc:
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        first = next((ln.strip() for ln in lines if re.search(r"\berror\b|Error [0-9]", ln)), None)
        raise CaptainError(exc.message, f"first error: {first}" if first else exc.hint) from None
    finally:
        progress.progress.close()


def _compile(cfg: Config, runner: Runner, source: Source, fragments: list[Path], parts: dict[str, Any],
             work: Path) -> None:
    # One compile at a time per build dir: another build of other inputs waits here instead of
    # swapping the source or object tree under this one.
    with cache.exclusive(cfg.build_dir / "kernel.lock"):
        _compile_in_build_dir(cfg, runner, source, fragments, parts, work)


def _compile_in_build_dir(cfg: Config, runner: Runner, source: Source, fragments: list[Path],
                          parts: dict[str, Any], work: Path) -> None:
    tree, obj, logs = _work_dirs(cfg)
    _prepare_tree(cfg, runner, source, tree)
    patch_command_line_size(tree, cfg.arch)
    patch_init_env_limit(tree)
    initramfs_options = INITRAMFS_OPTIONS if patch_initramfs_options(tree) else None
    # Objects of another tree or compiler are wiped; a changed config is left to kbuild,
    # which rebuilds what it affects.
    stamp = f"{source.identity} {parts['compiler']} {cfg.arch.value}"
    if (obj / ".captainos-tree").is_file() and (obj / ".captainos-tree").read_text().strip() != stamp:
        cache.remove(obj)
    obj.mkdir(parents=True, exist_ok=True)
    (obj / ".captainos-tree").write_text(stamp + "\n")
    fragment = merge_fragments(fragments)
    cache.atomic_write(obj / "captainos.config", fragment)
    jobs = os.cpu_count() or 1
    env = {"LOCALVERSION": "", **KBUILD_REPRODUCIBLE}
    _make(runner, tree, make_argv(cfg.arch, "allnoconfig", jobs, obj,
                                  [f"KCONFIG_ALLCONFIG={obj / 'captainos.config'}"]), logs / "allnoconfig.log", env)
    _make(runner, tree, make_argv(cfg.arch, "olddefconfig", jobs, obj), logs / "olddefconfig.log", env)
    resolved = parse_config((obj / ".config").read_text())
    if wrong := fragment_mismatches(fragment, resolved):
        raise CaptainError(f"the kernel config does not take {len(wrong)} option(s): {', '.join(wrong)}",
                           f"a dependency is missing or the name is wrong; fragments: "
                           f"{', '.join(str(p.relative_to(REPO)) for p in fragments)}")
    release = runner.run(make_argv(cfg.arch, "kernelrelease", 1, obj, ["-s"]), cwd=tree, capture=True,
                         env=env).stdout.strip()
    log.info(f"    compiling {release} for {cfg.arch.value} with -j{jobs} (full log: {logs / 'compile.log'})")
    _make(runner, tree, make_argv(cfg.arch, [cfg.arch.make_target(), "modules"], jobs, obj), logs / "compile.log",
          env)
    modules = work / "modules" / "usr"
    _make(runner, tree, make_argv(cfg.arch, "modules_install", jobs, obj,
                                  [f"INSTALL_MOD_PATH={modules}", "INSTALL_MOD_STRIP=1"]),
          logs / "modules_install.log", env)
    _finish_modules(runner, modules, release)
    image = obj / cfg.arch.kernel_image()
    if cfg.arch is Arch.AMD64 and bzimage_cmdline_size(image) != COMMAND_LINE_SIZE - 1:
        raise CaptainError(f"{image} reports cmdline_size {bzimage_cmdline_size(image)}, "
                           f"expected {COMMAND_LINE_SIZE - 1}", "the COMMAND_LINE_SIZE patch did not apply")
    shutil.copy2(image, work / "vmlinuz")
    shutil.copy2(obj / ".config", work / "config")
    check_required(work / "config")
    _write_json(work, {"version": release, "source": source.kind.value, "source_version": source.version,
                       "source_id": source.identity, "url": source.url or str(source.path or ""),
                       "arch": cfg.arch.value, "command_line_size": COMMAND_LINE_SIZE,
                       "init_env_arg_limit": INIT_ENV_ARG_LIMIT, "initramfs_options": initramfs_options,
                       "fragments": sorted(parts["fragments"]),
                       "compiler": parts["compiler"]}, modules, release)


def release(entry: Path) -> str:
    """`uname -r` of the kernel an entry of this stage holds."""
    return str(json.loads((entry / "kernel.json").read_text())["version"])


def _finish_modules(runner: Runner, modules: Path, release: str) -> None:
    """Drop the links into the build tree and (re)build the module indexes."""
    kdir = modules / "lib" / "modules" / release
    for link in ("build", "source"):
        if (kdir / link).is_symlink():
            (kdir / link).unlink()
    runner.run(["depmod", "-b", modules, release])


def _write_json(work: Path, info: dict[str, Any], modules: Path, release: str) -> None:
    kos = [p for p in (modules / "lib" / "modules" / release).rglob("*.ko*")]
    info["modules"] = len(kos)
    info["vmlinuz_bytes"] = (work / "vmlinuz").stat().st_size
    cache.atomic_write(work / "kernel.json", json.dumps(info, indent=1, sort_keys=True) + "\n")
    log.info(f"    {release}: vmlinuz {log.human_bytes(info['vmlinuz_bytes'])}, {len(kos)} modules")


# --- debian-image ------------------------------------------------------------------------

def _debian_image(cfg: Config, runner: Runner, source: Source) -> Path:
    assert source.package is not None
    parts = {"code": cache.code_digest(__file__), "arch": cfg.arch.value, "source": source.kind.value,
             "package": source.package.name,
             "version": source.package.version, "source_id": source.identity,
             "modules_list": cache.sha256_file(DEBIAN_MODULES)}
    entry = cache.cached(cfg.cache_dir, "kernel", cfg.arch.value, parts, force=cfg.force("kernel"),
                         produce=lambda work: _unpack_image(cfg, runner, source, work))
    kept = {module_name(p.name) for p in (entry / "modules").rglob("*.ko*")}
    builtin = (entry / "modules" / "usr" / "lib" / "modules" / release(entry) / "modules.builtin")
    kept |= {module_name(p) for p in builtin.read_text().split()} if builtin.is_file() else set()
    check_required(entry / "config", kept)
    return entry


def _unpack_image(cfg: Config, runner: Runner, source: Source, work: Path) -> None:
    assert source.package is not None
    deb = debian.fetch_verified(source.url, source.identity, cfg.cache_dir)
    unpacked = work / ".unpacked"
    debian.extract(runner, deb, unpacked)
    images = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise CaptainError(f"{deb.name} holds {len(images)} boot/vmlinuz-* files, expected one")
    release = images[0].name[len("vmlinuz-"):]
    src_mods = next((d for d in (unpacked / "usr/lib/modules" / release, unpacked / "lib/modules" / release)
                     if d.is_dir()), None)
    if src_mods is None:
        raise CaptainError(f"{deb.name} has no lib/modules/{release}")
    runner.run(["depmod", "-b", src_mods.parent.parent.parent, release])  # Debian ships no modules.dep

    def read(name: str) -> str:
        return (src_mods / name).read_text() if (src_mods / name).is_file() else ""

    keep = module_closure(read_module_list(cfg.arch), read("modules.dep"), read("modules.softdep"),
                          read("modules.builtin").split())
    modules = work / "modules" / "usr"
    dst_mods = modules / "lib" / "modules" / release
    for rel in [*keep, "modules.order", "modules.builtin", "modules.builtin.modinfo"]:
        if (src_mods / rel).is_file():
            (dst_mods / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_mods / rel, dst_mods / rel)
    _finish_modules(runner, modules, release)
    shutil.copy2(images[0], work / "vmlinuz")
    shutil.copy2(unpacked / "boot" / f"config-{release}", work / "config")
    total = len(parse_modules_dep(read("modules.dep")))
    cache.remove(unpacked)
    line_size = bzimage_cmdline_size(work / "vmlinuz") + 1 if cfg.arch is Arch.AMD64 else None
    if line_size is not None and line_size < COMMAND_LINE_SIZE:
        log.warn(f"Debian's kernel takes command lines of at most {line_size - 1} bytes; "
                 f"Smee's ISO patcher may need {COMMAND_LINE_SIZE - 1} (compile a kernel for that)")
    log.info(f"    kept {len(keep)} of {total} modules of {release}")
    _write_json(work, {"version": release, "source": source.kind.value, "source_version": source.package.version,
                       "package": source.package.name, "source_id": source.identity, "url": source.url,
                       "arch": cfg.arch.value, "command_line_size": line_size}, modules, release)
