"""The build, stage by stage: kernel -> tools -> initramfs -> iso -> checksums.

Stage contract (each stage module):
- `build(cfg, runner, ...) -> Path`: returns the stage's cache entry directory, produced
  through `cache.cached()` so that it is keyed by its inputs and written atomically.
- Entry layouts:
    kernel:    vmlinuz, config, kernel.json {"version": uname -r, "source": ...},
               modules/ (extra tree: usr/lib/modules/<version>/...)
    tools:     tree/ (extra tree: usr/bin/<binaries>, opt/cni/bin/<plugins>), manifest.json
    initramfs: initramfs.cpio.zst, sbom.spdx.json, packages.lock, image.json
    iso:       captainos.iso
- A stage in mode `skip` is not run; `cache.last()` gives its newest complete entry.
"""

from __future__ import annotations

from pathlib import Path

from captainos import artifacts, cache, image, iso, kernel, log, tools
from captainos.config import REPO, Config, StageMode
from captainos.run import DockerRunner, Runner


def runner_for(cfg: Config, mode: StageMode) -> Runner:
    if mode is StageMode.DOCKER:
        from captainos import docker

        return DockerRunner(image=docker.ensure_builder(cfg), mounts=(REPO, cfg.cache_dir))
    return Runner()


def _stage(cfg: Config, name: str, mode: StageMode) -> tuple[bool, Runner | None]:
    """(run it?, runner): a skipped stage reuses the newest complete entry."""
    if mode is StageMode.SKIP:
        log.info(f"==> {name}: skipped (mode skip), using the last build")
        return False, None
    return True, runner_for(cfg, mode)


def build_kernel(cfg: Config) -> Path:
    run_it, runner = _stage(cfg, "kernel", cfg.kernel_mode)
    if not run_it:
        return cache.last(cfg.cache_dir, "kernel", cfg.arch.value).root
    assert runner is not None
    with log.stage("kernel", f"{cfg.arch.value}, source {cfg.kernel_source.value}"):
        entry = kernel.build(cfg, runner)
        artifacts.publish(cfg.out_dir, entry / "vmlinuz", artifacts.vmlinuz_name(cfg.arch))
        artifacts.link_versioned(cfg.out_dir, cfg.arch, artifacts.vmlinuz_name(cfg.arch),
                                 kernel.release(entry))
        artifacts.publish(cfg.out_dir, entry / "config", f"kernel-config-{cfg.arch.value}")
    return entry


def build_tools(cfg: Config) -> Path:
    run_it, runner = _stage(cfg, "tools", cfg.tools_mode)
    if not run_it:
        return cache.last(cfg.cache_dir, "tools", cfg.arch.value).root
    assert runner is not None
    with log.stage("tools", f"{cfg.arch.value}, source {cfg.tools_source.value}"):
        return tools.build(cfg, runner)


def build_initramfs(cfg: Config, kernel_entry: Path, tools_entry: Path) -> Path:
    run_it, runner = _stage(cfg, "initramfs", cfg.initramfs_mode)
    if not run_it:
        return cache.last(cfg.cache_dir, "initramfs", cfg.arch.value).root
    assert runner is not None
    with log.stage("initramfs", f"mkosi, Debian trixie, {cfg.arch.value}"):
        entry = image.build(cfg, runner, kernel_entry, tools_entry)
        release = kernel.release(kernel_entry)
        for name, published in ((image.OUTPUT, artifacts.initramfs_name(cfg.arch)),
                                (image.SBOM, artifacts.sbom_name(cfg.arch)),
                                (image.LOCK, artifacts.lock_name(cfg.arch))):
            artifacts.publish(cfg.out_dir, entry / name, published)
            artifacts.link_versioned(cfg.out_dir, cfg.arch, published, release)
        artifacts.link_smee_names(cfg.out_dir, cfg.arch)
    return entry


def build_iso(cfg: Config, kernel_entry: Path, initramfs_entry: Path) -> Path | None:
    run_it, runner = _stage(cfg, "iso", cfg.iso_mode)
    if not run_it:
        return None
    assert runner is not None
    with log.stage("iso", f"UEFI hybrid ISO, {cfg.arch.value}"):
        entry = iso.build(cfg, runner, kernel_entry / "vmlinuz", initramfs_entry / "initramfs.cpio.zst")
        artifacts.publish(cfg.out_dir, entry / "captainos.iso", artifacts.iso_name(cfg.arch))
        artifacts.link_versioned(cfg.out_dir, cfg.arch, artifacts.iso_name(cfg.arch),
                                 kernel.release(kernel_entry))
    return entry


def build(cfg: Config) -> None:
    """The whole build; each line is one stage."""
    kernel_entry = build_kernel(cfg)
    tools_entry = build_tools(cfg)
    initramfs_entry = build_initramfs(cfg, kernel_entry, tools_entry)
    build_iso(cfg, kernel_entry, initramfs_entry)
    with log.stage("checksums"):
        artifacts.write_checksums(cfg.out_dir, cfg.arch)
