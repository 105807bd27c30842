"""The stage table: kernel -> tools -> initramfs -> iso, then checksums.

One row per stage says everything the rest of the tool needs to know about it: its verb's
help, the option that says how it runs (`--<stage>-mode native|docker|skip`), the earlier
stages whose entries it consumes, the host commands it needs, how it produces its cache
entry and what it publishes to out/. The verbs (cli), the prerequisite check (host),
`summary` and `build` all read this table; `run_stage` is the one place that skips, picks a
runner, logs and publishes.

Stage contract (each stage module):
- `build(cfg, runner, ...) -> Path`: returns the stage's cache entry directory, produced
  through `cache.cached()` so that it is keyed by its inputs and written atomically.
- Entry layouts:
    kernel:    vmlinuz, config, kernel.json {"version": uname -r, "source": ...},
               modules/ (extra tree: usr/lib/modules/<version>/...)
    tools:     tree/ (extra tree: usr/bin/<binaries>, opt/cni/bin/<plugins>), manifest.json
    initramfs: initramfs.cpio.zst, sbom.spdx.json, packages.lock, image.json
    iso:       captainos.iso
- A stage in mode `skip` is not run; `cache.last()` gives its newest complete entry (the
  ISO, which nothing consumes, gives none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from captainos.core import cache, log, needs
from captainos.core.config import REPO, Config, KernelSource, StageMode, ToolsSource
from captainos.core.needs import Need
from captainos.core.run import DockerRunner, Runner
from captainos.stages import artifacts

Entries = dict[str, Path]


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # the verb's line in --help
    inputs: tuple[str, ...]  # earlier stages whose entries produce() takes, in this order
    detail: Callable[[Config], str]  # what the stage's log line says it does
    produce: Callable[[Config, Runner, Entries], Path]  # the cache entry, built or hit
    publish: Callable[[Config, Path, Entries], None]  # copies and links into out/
    requires: Callable[[Config], tuple[Need, ...]]  # host commands when it runs natively
    reusable: bool = True  # mode skip reuses the last entry (False: nothing consumes it)

    def mode(self, cfg: Config) -> StageMode:
        mode: StageMode = getattr(cfg, f"{self.name}_mode")
        return mode


def _kernel(cfg: Config, runner: Runner, entries: Entries) -> Path:
    from captainos.stages import kernel

    return kernel.build(cfg, runner)


def _publish_kernel(cfg: Config, entry: Path, entries: Entries) -> None:
    from captainos.stages import kernel

    artifacts.publish(cfg.out_dir, entry / "vmlinuz", artifacts.vmlinuz_name(cfg.arch))
    artifacts.link_versioned(cfg.out_dir, cfg.arch, artifacts.vmlinuz_name(cfg.arch), kernel.release(entry))
    artifacts.publish(cfg.out_dir, entry / "config", f"kernel-config-{cfg.arch.value}")


def _kernel_needs(cfg: Config) -> tuple[Need, ...]:
    if cfg.kernel_source is KernelSource.DEBIAN_IMAGE:
        return needs.KERNEL_PACKAGES
    if cfg.arch.is_host():
        return needs.KERNEL_COMPILE
    return (*needs.KERNEL_COMPILE, Need(f"{cfg.arch.cross_compile()}gcc", "cross-compiling the kernel",
                                        f"gcc-{cfg.arch.uname()}-linux-gnu"))


def _tools(cfg: Config, runner: Runner, entries: Entries) -> Path:
    from captainos.stages import tools

    return tools.build(cfg, runner)


def _initramfs(cfg: Config, runner: Runner, entries: Entries) -> Path:
    from captainos.stages import image

    return image.build(cfg, runner, entries["kernel"], entries["tools"])


def _publish_initramfs(cfg: Config, entry: Path, entries: Entries) -> None:
    from captainos.stages import image, kernel

    release = kernel.release(entries["kernel"])
    for name, published in ((image.OUTPUT, artifacts.initramfs_name(cfg.arch)),
                            (image.SBOM, artifacts.sbom_name(cfg.arch)),
                            (image.LOCK, artifacts.lock_name(cfg.arch))):
        artifacts.publish(cfg.out_dir, entry / name, published)
        artifacts.link_versioned(cfg.out_dir, cfg.arch, published, release)
    artifacts.link_smee_names(cfg.out_dir, cfg.arch)


def _initramfs_needs(cfg: Config) -> tuple[Need, ...]:
    if cfg.embed_images is None:
        return needs.INITRAMFS
    return (*needs.INITRAMFS, Need("skopeo", "pulling the embedded images (--embed-images)", "skopeo"))


def _iso(cfg: Config, runner: Runner, entries: Entries) -> Path:
    from captainos.stages import iso

    return iso.build(cfg, runner, entries["kernel"] / "vmlinuz", entries["initramfs"] / "initramfs.cpio.zst")


def _publish_iso(cfg: Config, entry: Path, entries: Entries) -> None:
    from captainos.stages import kernel

    artifacts.publish(cfg.out_dir, entry / "captainos.iso", artifacts.iso_name(cfg.arch))
    artifacts.link_versioned(cfg.out_dir, cfg.arch, artifacts.iso_name(cfg.arch), kernel.release(entries["kernel"]))


STAGES: tuple[Stage, ...] = (
    Stage("kernel", "build or fetch the kernel and its modules", (),
          lambda cfg: f"{cfg.arch.value}, source {cfg.kernel_source.value}",
          _kernel, _publish_kernel, _kernel_needs),
    Stage("tools", "produce containerd, runc, nerdctl and the CNI plugins at their pinned versions", (),
          lambda cfg: f"{cfg.arch.value}, source {cfg.tools_source.value}",
          _tools, lambda cfg, entry, entries: None,
          lambda cfg: (needs.c_compiler(cfg.arch),
                       *(() if cfg.tools_source is ToolsSource.RELEASE else needs.TOOLS_GO))),
    Stage("initramfs", "assemble the initramfs with mkosi (needs the kernel and tools stages)", ("kernel", "tools"),
          lambda cfg: f"mkosi, Debian trixie, {cfg.arch.value}",
          _initramfs, _publish_initramfs, _initramfs_needs),
    Stage("iso", "build the UEFI-bootable ISO from the kernel and initramfs", ("kernel", "initramfs"),
          lambda cfg: f"UEFI hybrid ISO, {cfg.arch.value}",
          _iso, _publish_iso, lambda cfg: needs.ISO, reusable=False),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)


def closure(name: str) -> tuple[Stage, ...]:
    """The stage and every stage it consumes, directly or not, in table order."""
    wanted = {name}
    for stage in reversed(STAGES):
        if stage.name in wanted:
            wanted.update(stage.inputs)
    return tuple(stage for stage in STAGES if stage.name in wanted)


def stages_of(verb: str) -> tuple[str, ...]:
    """The stages a verb runs: `build` all of them, a stage verb its closure, others none."""
    if verb == "build":
        return NAMES
    return tuple(stage.name for stage in closure(verb)) if verb in BY_NAME else ()


def runner_for(cfg: Config, mode: StageMode) -> Runner:
    if mode is StageMode.DOCKER:
        from captainos.core import docker

        return DockerRunner(image=docker.ensure_builder(cfg), mounts=(REPO, cfg.cache_dir))
    return Runner()


def run_stage(cfg: Config, stage: Stage, entries: Entries) -> Path | None:
    """The stage's entry: the newest one when skipped, else produced (cache hit or build) and
    published to out/. entries holds the entries of the stages it consumes."""
    mode = stage.mode(cfg)
    if mode is StageMode.SKIP:
        log.info(f"==> {stage.name}: skipped (mode skip), using the last build")
        return cache.last(cfg.cache_dir, stage.name, cfg.arch.value).root if stage.reusable else None
    runner = runner_for(cfg, mode)
    with log.stage(stage.name, stage.detail(cfg)):
        entry = stage.produce(cfg, runner, entries)
        stage.publish(cfg, entry, entries)
    return entry


def run_through(cfg: Config, name: str) -> Entries:
    """Run the named stage and the stages it consumes; their entries by stage name."""
    entries: Entries = {}
    for stage in closure(name):
        entry = run_stage(cfg, stage, {n: entries[n] for n in stage.inputs})
        if entry is not None:
            entries[stage.name] = entry
    return entries


def build(cfg: Config) -> None:
    """The whole build: every stage, then the checksums of out/."""
    run_through(cfg, STAGES[-1].name)
    with log.stage("checksums"):
        artifacts.write_checksums(cfg.out_dir, cfg.arch)


# One call per stage for callers that hold the entries already (tests, bench).
def _entry(cfg: Config, name: str, entries: Entries) -> Path:
    entry = run_stage(cfg, BY_NAME[name], entries)
    assert entry is not None  # only the ISO, which these callers never skip, can give none
    return entry


def build_kernel(cfg: Config) -> Path:
    return _entry(cfg, "kernel", {})


def build_tools(cfg: Config) -> Path:
    return _entry(cfg, "tools", {})


def build_initramfs(cfg: Config, kernel_entry: Path, tools_entry: Path) -> Path:
    return _entry(cfg, "initramfs", {"kernel": kernel_entry, "tools": tools_entry})


def build_iso(cfg: Config, kernel_entry: Path, initramfs_entry: Path) -> Path | None:
    return run_stage(cfg, BY_NAME["iso"], {"kernel": kernel_entry, "initramfs": initramfs_entry})
