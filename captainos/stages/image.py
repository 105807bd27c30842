"""initramfs stage: mkosi turns image/ into a CPIO with the kernel modules; the container
tools follow it as a second archive (segments.py), and both are zstd-compressed.

The image tree (image/) holds everything that does not change per build; this module adds
what does, on mkosi's command line: the architecture, the extra trees (kernel modules, their
firmware (firmware.py), extra CA certificates, a build manifest), the OS version, the
profiles and the source date epoch.
vmlinuz never goes into the initramfs: it is published next to it by the kernel stage.

mkosi's output directory is persistent (build/<arch>/mkosi) because mkosi keeps its Debian
tools tree there; the package cache and mkosi's incremental image cache live in the cache
directory. The stage's cache entry holds only `initramfs.cpio.zst` and `image.json`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captainos import __version__
from captainos.core import cache, log, pins
from captainos.core.config import REPO, Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import mkosi
from captainos.stages import cpio, firmware, sbom, segments, site

IMAGE_DIR = REPO / "image"
OUTPUT = "initramfs.cpio.zst"
SBOM = "sbom.spdx.json"  # beside OUTPUT in the entry, and inside the image (sbom.SBOM_PATH)
LOCK = "packages.lock"  # the Debian packages (and kernel source) the build used, from the SBOM
MKOSI_OUTPUT = "initramfs.cpio"  # Output= in image/mkosi.conf plus the format's suffix (no compression)
CA_DIR = Path("usr/local/share/ca-certificates")
MANIFEST = Path("usr/share/captainos/image.json")
# The kernel stage's option list and checker (kernel/), run by the self-test and by hand.
KERNEL_REQUIRED = REPO / "kernel" / "required.txt"
KERNEL_CHECKER = REPO / "kernel" / "check-kernel-config.sh"
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
TEST_PROFILE = "test"


def mkosi_command() -> list[str]:
    """The argv prefix that runs the pinned mkosi (self-contained: works through any Runner)."""
    return ["env", f"PYTHONPATH={mkosi.pythonpath()}", "python3", "-m", "mkosi"]


def mkosi_dirs(cfg: Config) -> tuple[Path, Path]:
    """(output dir, cache dir): mkosi's tools tree lives in the first, its caches in the second."""
    return cfg.build_dir / "mkosi", cfg.cache_dir / "mkosi" / cfg.arch.value


def mkosi_argv(
    arch: Arch,
    *,
    output_dir: Path,
    cache_dir: Path,
    extra_trees: Sequence[Path],
    profiles: Sequence[str],
    version: str,
    rebuild_caches: bool = False,
    image_dir: Path = IMAGE_DIR,
) -> list[str]:
    """The mkosi command line that builds the initramfs (pure).

    `-f` replaces the previous output in the persistent output dir; `-ff` (rebuild_caches)
    also drops mkosi's incremental and package caches.
    """
    # mkosi keeps one incremental cache per distribution, release and architecture, whatever
    # the profiles: images with other profiles (test, ssh) get their own, or each would evict
    # the other's and every alternate build would start from nothing.
    incremental = cache_dir / "incremental" / ("+".join(sorted(profiles)) or "default")
    argv = [*mkosi_command(), "-C", str(image_dir), f"--architecture={arch.mkosi_arch()}",
            f"--output-dir={output_dir}", f"--cache-directory={incremental}",
            f"--package-cache-directory={cache_dir / 'packages'}", "--incremental=yes",
            f"--image-version={version}", f"--source-date-epoch={pins.SOURCE_DATE_EPOCH}"]
    argv += [f"--extra-tree={tree}" for tree in extra_trees]
    argv += [f"--profile={profile}" for profile in profiles]
    argv += ["-ff" if rebuild_caches else "-f", "build"]
    return argv


def summary_argv(cfg: Config) -> list[str]:
    """`mkosi summary` for this configuration (used by `./build.py summary`)."""
    argv = [*mkosi_command(), "-C", str(IMAGE_DIR), f"--architecture={cfg.arch.mkosi_arch()}",
            f"--image-version={__version__}"]
    argv += [f"--profile={profile}" for profile in site.profiles(cfg)]
    return [*argv, "summary"]


def check_profiles(profiles: Sequence[str], image_dir: Path = IMAGE_DIR) -> None:
    """Every requested profile exists as image/mkosi.profiles/<name>."""
    available = sorted(p.name for p in (image_dir / "mkosi.profiles").iterdir() if p.is_dir())
    for profile in profiles:
        if profile not in available:
            raise CaptainError(f"unknown mkosi profile {profile!r}", f"available: {', '.join(available)}")


def check_ca_certs(paths: Sequence[Path]) -> None:
    """Each extra CA file exists and holds at least one PEM certificate."""
    for path in paths:
        if not path.is_file():
            raise CaptainError(f"extra CA certificate {path} does not exist",
                               "EXTRA_CA_CERTS lists PEM files; the lab's CA is made by './build.py lab ca'")
        if PEM_BEGIN not in path.read_bytes():
            raise CaptainError(f"extra CA certificate {path} is not a PEM certificate",
                               "convert it with: openssl x509 -in CERT -out CERT.pem")


def stage_ca_tree(paths: Sequence[Path], tree: Path) -> None:
    """Place the CA files where update-ca-certificates (mkosi.postinst) picks them up."""
    for index, path in enumerate(paths):
        cache.atomic_copy(path, tree / CA_DIR / f"captainos-extra-{index}-{path.stem}.crt")


def stage_captainos_tree(cfg: Config, kernel_entry: Path, tools_entry: Path, tree: Path) -> None:
    """The build's own files: the manifest, the kernel's config next to its modules (for
    check-kernel-config, since /proc/config.gz may be absent), the kernel option checker, and
    for the test profile the tools the shipped image leaves out."""
    cache.atomic_write(tree / MANIFEST,
                       json.dumps(manifest(cfg, kernel_entry, tools_entry), indent=1, sort_keys=True) + "\n")
    version = manifest(cfg, kernel_entry, tools_entry)["kernel"]
    if version and (kernel_entry / "config").is_file():
        cache.atomic_copy(kernel_entry / "config", tree / "usr/lib/modules" / version / "config")
    if KERNEL_REQUIRED.is_file():
        cache.atomic_copy(KERNEL_REQUIRED, tree / "usr/lib/captainos/kernel-required.txt")
    if TEST_PROFILE in cfg.profiles:  # the self-test drives containerd with ctr, which segments.py leaves out
        for rel in segments.TOOLS_LEFT_OUT:
            cache.atomic_copy(tools_entry / "tree" / rel, tree / rel)
    if KERNEL_CHECKER.is_file():
        cache.atomic_copy(KERNEL_CHECKER, tree / "usr/lib/captainos/check-kernel-config")
        (tree / "usr/lib/captainos/check-kernel-config").chmod(0o755)


def manifest(cfg: Config, kernel_entry: Path, tools_entry: Path) -> dict[str, Any]:
    """What this image was built from; shipped as /usr/share/captainos/image.json."""
    kernel_json = kernel_entry / "kernel.json"
    kernel = json.loads(kernel_json.read_text()) if kernel_json.is_file() else {}
    return {"name": "CaptainOS", "version": __version__, "arch": cfg.arch.value,
            "kernel": kernel.get("version", ""), "kernel_entry": kernel_entry.name,
            "tools_entry": tools_entry.name, "profiles": list(site.profiles(cfg)),
            "extra_ca_certs": [cache.sha256_file(p) for p in cfg.extra_ca_certs]}


def inputs(cfg: Config, kernel_entry: Path, tools_entry: Path, firmware_entry: Path | None = None
           ) -> dict[str, Any]:
    """Everything the image depends on: a change to any of these builds a new entry."""
    return {
        "arch": cfg.arch.value,
        "version": __version__,
        "image_tree": cache.hash_tree(IMAGE_DIR),
        "kernel": kernel_entry.name,
        "firmware": firmware_entry.name if firmware_entry else None,
        "tools": tools_entry.name,
        "profiles": list(site.profiles(cfg)),
        "extra_ca_certs": [cache.sha256_file(p) for p in cfg.extra_ca_certs],
        "mkosi": pins.MKOSI.version,
        # how the extra trees are staged and the segments compressed
        "code": cache.code_digest(__file__, segments.__file__, sbom.__file__, cpio.__file__),
        "source_date_epoch": pins.SOURCE_DATE_EPOCH,
        "kernel_checker": [cache.sha256_file(p) for p in (KERNEL_REQUIRED, KERNEL_CHECKER) if p.is_file()],
    }


def _check_entries(kernel_entry: Path, tools_entry: Path) -> Path:
    modules, tools_tree = kernel_entry / "modules", tools_entry / "tree"
    if not (modules / "usr" / "lib" / "modules").is_dir():
        raise CaptainError(f"the kernel entry {kernel_entry} has no modules/usr/lib/modules",
                           "rebuild the kernel stage: ./build.py kernel --force-kernel")
    if not (tools_tree / "usr" / "bin" / "containerd").is_file():
        raise CaptainError(f"the tools entry {tools_entry} has no tree/usr/bin/containerd",
                           "rebuild the tools stage: ./build.py tools --force-tools")
    return modules


def build(cfg: Config, runner: Runner, kernel_entry: Path, tools_entry: Path) -> Path:
    """Build (or reuse) the initramfs entry for these kernel and tools entries."""
    check_profiles(site.profiles(cfg))
    check_ca_certs(cfg.extra_ca_certs)
    site.check(cfg)
    modules = _check_entries(kernel_entry, tools_entry)
    output_dir, mkosi_cache = mkosi_dirs(cfg)
    tools_segment = segments.tools_segment(cfg, runner, tools_entry)
    firmware_entry = firmware.build(cfg, runner, kernel_entry)

    def produce(work: Path) -> None:
        staging = work / "staging"
        ca_tree, own_tree = staging / "ca", staging / "captainos"
        stage_ca_tree(cfg.extra_ca_certs, ca_tree)
        stage_captainos_tree(cfg, kernel_entry, tools_entry, own_tree)
        trees = [modules, firmware_entry / "tree", own_tree, *([ca_tree] if cfg.extra_ca_certs else [])]
        output_dir.mkdir(parents=True, exist_ok=True)
        mkosi_cache.mkdir(parents=True, exist_ok=True)
        argv = mkosi_argv(cfg.arch, output_dir=output_dir, cache_dir=mkosi_cache, extra_trees=trees,
                          profiles=site.profiles(cfg), version=__version__, rebuild_caches=cfg.no_cache)
        mkosi_log = cfg.build_dir / "mkosi.log"  # outside the entry: kept when the build fails
        # One mkosi at a time per output dir: a second build of the same arch waits here
        # instead of overwriting the first one's output.
        with cache.exclusive(output_dir / ".captainos.lock"):
            progress = log.Progress("mkosi")
            try:
                runner.run(argv, log_file=mkosi_log, on_line=lambda line: progress.update(0, line[:80]))
            finally:
                progress.close()
            built = output_dir / MKOSI_OUTPUT
            if not built.is_file() or built.is_symlink():
                raise CaptainError(f"mkosi finished but {built} is missing", f"see {mkosi_log}")
            shutil.move(built, work / "os.cpio")
        shutil.rmtree(staging)
        # The SBOM is read from the two segments' bytes and rides in a third, small one.
        document, lock = sbom.write((work / "os.cpio").read_bytes() + cpio.decompress(tools_segment), cfg.arch,
                                    kernel_entry)
        segments.compress(runner, segments.OS_ZSTD, work / "os.cpio", work / "os.cpio.zst")
        cache.atomic_write(work / SBOM, document)
        cache.atomic_write(work / LOCK, lock)
        (work / "sbom.cpio").write_bytes(cpio.write([(sbom.SBOM_PATH, 0o100644, document)]))
        segments.compress(runner, segments.OS_ZSTD, work / "sbom.cpio", work / "sbom.cpio.zst")
        segments.concatenate([work / "os.cpio.zst", tools_segment, work / "sbom.cpio.zst"], work / OUTPUT)
        sizes = {"os": (work / "os.cpio.zst").stat().st_size, "tools": tools_segment.stat().st_size,
                 "sbom": (work / "sbom.cpio.zst").stat().st_size}
        for part in ("os.cpio.zst", "sbom.cpio.zst"):
            (work / part).unlink()
        size = (work / OUTPUT).stat().st_size
        cache.atomic_write(work / "image.json", json.dumps({"size": size, "segments": sizes,
                                                           **manifest(cfg, kernel_entry, tools_entry)},
                                                          indent=1, sort_keys=True) + "\n")
        log.info(f"    {OUTPUT}: {log.human_bytes(size)} (os {log.human_bytes(sizes['os'])}, "
                 f"tools {log.human_bytes(sizes['tools'])})")

    entry = cache.cached(cfg.cache_dir, "initramfs", cfg.arch.value,
                         inputs(cfg, kernel_entry, tools_entry, firmware_entry), force=cfg.force("initramfs"),
                         produce=produce)
    return site.build(cfg, runner, entry) if site.wanted(cfg) else entry
