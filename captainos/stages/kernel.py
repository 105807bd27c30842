"""kernel stage: vmlinuz, its config and its modules for one architecture.

build() picks the source (sources/kernel.py: local, kernel-org, debian-source, debian-image)
and either compiles it or, for debian-image, unpacks Debian's signed prebuilt image with its
modules trimmed to kernel/debian-modules.txt plus their dependencies. The compiled sources
are patched (kernel_patch.py) and configured with kernel/configs/<series>/{common,<arch>}.config
merged over `make allnoconfig` (kernel_config.py; docs/decisions/kernel-source.md says why).
Every entry is checked against kernel/required.txt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captainos.core import cache, log, pins
from captainos.core.config import REPO, Arch, Config, KernelSource
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import debian
from captainos.sources import kernel as kernel_source
from captainos.stages import kernel_config, kernel_patch

# What kbuild would otherwise take from the clock and from a counter in the object dir (the
# "#N SMP PREEMPT_DYNAMIC <date>" in the version string): fixed, so that a compile gives the
# same vmlinuz in a fresh object dir, an incremental one, today and next week.
KBUILD_REPRODUCIBLE = {"KBUILD_BUILD_TIMESTAMP": time.strftime("%a %b %d %H:%M:%S UTC %Y",
                                                              time.gmtime(pins.SOURCE_DATE_EPOCH)),
                       "KBUILD_BUILD_VERSION": "1", "KBUILD_BUILD_USER": "captainos",
                       "KBUILD_BUILD_HOST": "captainos"}
_VERSION = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
# The code of an entry, for its cache key: this stage and the modules it is made from.
CODE = (__file__, kernel_source.__file__, kernel_config.__file__, kernel_patch.__file__)


# --- the stage ---------------------------------------------------------------------------

def build(cfg: Config, runner: Runner, *inputs: Path) -> Path:
    """The kernel entry (vmlinuz, config, kernel.json, modules/) for cfg.arch."""
    if not _VERSION.match(cfg.kernel_version):
        raise CaptainError(f"invalid KERNEL_VERSION {cfg.kernel_version!r}", "use a release like 6.12.69")
    kind, reason = kernel_source.select_source(cfg)
    if cfg.kernel_source is KernelSource.AUTO:
        log.info(f"    kernel source: {kind.value} ({reason})")
    if kind is KernelSource.DEBIAN_IMAGE:
        return _debian_image(cfg, runner, kernel_source.resolve(cfg, kind))
    version = kernel_source.tree_version(cfg.kernel_src.resolve()) if kind is KernelSource.LOCAL and cfg.kernel_src \
        else cfg.kernel_version
    kernel_config.config_fragments(kernel_source.series(version), cfg.arch)  # fail before any download without a config
    source = kernel_source.resolve(cfg, kind)
    if kind is KernelSource.DEBIAN_SOURCE and source.version != cfg.kernel_version:
        log.info(f"    Debian {pins.DEBIAN_RELEASE} ships {source.version} (KERNEL_VERSION applies to kernel-org)")
    return _compiled(cfg, runner, source)


# --- compile -----------------------------------------------------------------------------

def _compiler(cfg: Config, runner: Runner) -> str:
    cc = f"{cfg.arch.cross_compile()}gcc"
    return f"{cc} " + runner.run([cc, "-dumpfullversion"], capture=True).stdout.strip()


def compile_parts(arch: Arch, source: kernel_source.Source, fragments: Sequence[Path],
                  compiler: str) -> dict[str, Any]:
    """Every input of a compiled kernel: the cache key is a digest of this."""
    return {
        "code": cache.code_digest(*CODE), "arch": arch.value, "source": source.kind.value, "version": source.version,
        "source_id": source.identity, "command_line_size": kernel_patch.COMMAND_LINE_SIZE,
        "init_env_arg_limit": kernel_patch.INIT_ENV_ARG_LIMIT, "initramfs_options": kernel_patch.INITRAMFS_OPTIONS,
        "compiler": compiler,
        "fragments": {f"{p.parent.name}/{p.name}": cache.sha256_file(p) for p in fragments},
        "kbuild_env": KBUILD_REPRODUCIBLE,
    }


def _compiled(cfg: Config, runner: Runner, source: kernel_source.Source) -> Path:
    fragments = kernel_config.config_fragments(kernel_source.series(source.version), cfg.arch)
    parts = compile_parts(cfg.arch, source, fragments, _compiler(cfg, runner))
    entry = cache.cached(cfg.cache_dir, "kernel", cfg.arch.value, parts, force=cfg.force("kernel"),
                         produce=lambda work: _compile(cfg, runner, source, fragments, parts, work))
    kernel_config.check_required(entry / "config")
    return entry


def _work_dirs(cfg: Config) -> tuple[Path, Path, Path]:
    """(source tree, object tree, log directory: one <step>.log per make step)."""
    base = cfg.build_dir / "kernel"
    return base / "src", base / "obj", base / "logs"


def make_argv(arch: Arch, target: str | Sequence[str], jobs: int, build_dir: Path,
              extra: Sequence[str] = ()) -> list[str]:
    """make for one target in the source tree (the cwd), objects in build_dir."""
    targets = [target] if isinstance(target, str) else list(target)
    argv = ["make", f"-j{jobs}", f"O={build_dir}", f"ARCH={arch.kernel_arch()}"]
    if arch.cross_compile():
        argv.append(f"CROSS_COMPILE={arch.cross_compile()}")
    return argv + list(extra) + targets


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


def _compile(cfg: Config, runner: Runner, source: kernel_source.Source, fragments: list[Path],
             parts: dict[str, Any], work: Path) -> None:
    # One compile at a time per build dir: another build of other inputs waits here instead of
    # swapping the source or object tree under this one.
    with cache.exclusive(cfg.build_dir / "kernel.lock"):
        _compile_in_build_dir(cfg, runner, source, fragments, parts, work)


def _compile_in_build_dir(cfg: Config, runner: Runner, source: kernel_source.Source, fragments: list[Path],
                          parts: dict[str, Any], work: Path) -> None:
    tree, obj, logs = _work_dirs(cfg)
    kernel_source.prepare_tree(runner, source, tree, cfg.cache_dir)
    kernel_patch.patch_command_line_size(tree, cfg.arch)
    kernel_patch.patch_init_env_limit(tree)
    initramfs_options = kernel_patch.INITRAMFS_OPTIONS if kernel_patch.patch_initramfs_options(tree) else None
    # Objects of another tree or compiler are wiped; a changed config is left to kbuild,
    # which rebuilds what it affects.
    stamp = f"{source.identity} {parts['compiler']} {cfg.arch.value}"
    if (obj / ".captainos-tree").is_file() and (obj / ".captainos-tree").read_text().strip() != stamp:
        cache.remove(obj)
    obj.mkdir(parents=True, exist_ok=True)
    (obj / ".captainos-tree").write_text(stamp + "\n")
    fragment = kernel_config.merge_fragments(fragments)
    cache.atomic_write(obj / "captainos.config", fragment)
    jobs = os.cpu_count() or 1
    env = {"LOCALVERSION": "", **KBUILD_REPRODUCIBLE}
    _make(runner, tree, make_argv(cfg.arch, "allnoconfig", jobs, obj,
                                  [f"KCONFIG_ALLCONFIG={obj / 'captainos.config'}"]), logs / "allnoconfig.log", env)
    _make(runner, tree, make_argv(cfg.arch, "olddefconfig", jobs, obj), logs / "olddefconfig.log", env)
    resolved = kernel_config.parse_config((obj / ".config").read_text())
    if wrong := kernel_config.fragment_mismatches(fragment, resolved):
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
    if cfg.arch is Arch.AMD64 and kernel_patch.bzimage_cmdline_size(image) != kernel_patch.COMMAND_LINE_SIZE - 1:
        raise CaptainError(f"{image} reports cmdline_size {kernel_patch.bzimage_cmdline_size(image)}, "
                           f"expected {kernel_patch.COMMAND_LINE_SIZE - 1}",
                           "the COMMAND_LINE_SIZE patch did not apply")
    shutil.copy2(image, work / "vmlinuz")
    shutil.copy2(obj / ".config", work / "config")
    kernel_config.check_required(work / "config")
    _write_json(work, {"version": release, "source": source.kind.value, "source_version": source.version,
                       "source_id": source.identity, "url": source.url or str(source.path or ""),
                       "arch": cfg.arch.value, "command_line_size": kernel_patch.COMMAND_LINE_SIZE,
                       "init_env_arg_limit": kernel_patch.INIT_ENV_ARG_LIMIT,
                       "initramfs_options": initramfs_options, "fragments": sorted(parts["fragments"]),
                       "compiler": parts["compiler"]}, modules, release)


# --- the entry ---------------------------------------------------------------------------

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

def _debian_image(cfg: Config, runner: Runner, source: kernel_source.Source) -> Path:
    assert source.package is not None
    parts = {"code": cache.code_digest(*CODE), "arch": cfg.arch.value, "source": source.kind.value,
             "package": source.package.name,
             "version": source.package.version, "source_id": source.identity,
             "modules_list": cache.sha256_file(kernel_config.DEBIAN_MODULES)}
    entry = cache.cached(cfg.cache_dir, "kernel", cfg.arch.value, parts, force=cfg.force("kernel"),
                         produce=lambda work: _unpack_image(cfg, runner, source, work))
    kept = {kernel_config.module_name(p.name) for p in (entry / "modules").rglob("*.ko*")}
    builtin = (entry / "modules" / "usr" / "lib" / "modules" / release(entry) / "modules.builtin")
    kept |= {kernel_config.module_name(p) for p in builtin.read_text().split()} if builtin.is_file() else set()
    kernel_config.check_required(entry / "config", kept)
    return entry


def _unpack_image(cfg: Config, runner: Runner, source: kernel_source.Source, work: Path) -> None:
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

    keep = kernel_config.module_closure(kernel_config.read_module_list(cfg.arch), read("modules.dep"),
                                        read("modules.softdep"), read("modules.builtin").split())
    modules = work / "modules" / "usr"
    dst_mods = modules / "lib" / "modules" / release
    for rel in [*keep, "modules.order", "modules.builtin", "modules.builtin.modinfo"]:
        if (src_mods / rel).is_file():
            (dst_mods / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_mods / rel, dst_mods / rel)
    _finish_modules(runner, modules, release)
    shutil.copy2(images[0], work / "vmlinuz")
    shutil.copy2(unpacked / "boot" / f"config-{release}", work / "config")
    total = len(kernel_config.parse_modules_dep(read("modules.dep")))
    cache.remove(unpacked)
    line_size = kernel_patch.bzimage_cmdline_size(work / "vmlinuz") + 1 if cfg.arch is Arch.AMD64 else None
    if line_size is not None and line_size < kernel_patch.COMMAND_LINE_SIZE:
        log.warn(f"Debian's kernel takes command lines of at most {line_size - 1} bytes; "
                 f"Smee's ISO patcher may need {kernel_patch.COMMAND_LINE_SIZE - 1} (compile a kernel for that)")
    log.info(f"    kept {len(keep)} of {total} modules of {release}")
    _write_json(work, {"version": release, "source": source.kind.value, "source_version": source.package.version,
                       "package": source.package.name, "source_id": source.identity, "url": source.url,
                       "arch": cfg.arch.value, "command_line_size": line_size}, modules, release)
