"""The stage table: kernel -> tools -> initramfs -> iso, then checksums.

One row per stage says everything the rest of the tool needs to know about it: its verb's
help and own flags, its options (`--<stage>-mode native|docker|skip`, and `--force-<stage>`
when it has one: config.stage_options makes them from the row), the earlier stages whose
entries it consumes, the host commands it needs and the checks before any work, how it
produces its cache entry and what it publishes to out/. The verbs, flags and env vars (cli),
the configuration (config.load through `options()`), the prerequisite check (host),
`summary` and `build` all read this table; `run_stage` is the one place that skips, picks a
runner, logs and publishes.

Adding a stage: its module, its row here, its tests. Everything reads `STAGES` when it runs
(nothing copies it at import), so a test adds a row with
`monkeypatch.setattr(pipeline, "STAGES", (*pipeline.STAGES, row))`
(tests/unit/test_pipeline.py, the `toy` fixture).

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

from captainos.core import cache, config, log, needs
from captainos.core.config import REPO, Config, Flag, KernelSource, Option, StageMode, ToolsSource, flag
from captainos.core.errors import CaptainError
from captainos.core.needs import Need
from captainos.core.run import DockerRunner, Runner
from captainos.stages import artifacts

Entries = dict[str, Path]


def _no_preflight(cfg: Config, mode: StageMode) -> tuple[Need, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # the verb's line in --help
    inputs: tuple[str, ...]  # earlier stages whose entries produce() takes, in this order
    detail: Callable[[Config], str]  # what the stage's log line says it does
    produce: Callable[[Config, Runner, Entries], Path]  # the cache entry, built or hit
    publish: Callable[[Config, Path, Entries], None]  # copies and links into out/
    requires: Callable[[Config], tuple[Need, ...]]  # host commands when it runs natively
    mode_help: str  # the help of its --<stage>-mode option
    force_help: str = ""  # the help of its --force-<stage> option; none when empty
    flags: tuple[Flag, ...] = ()  # its verb's own flags
    # Before any work, for each stage a verb covers (skipped ones too, given their mode):
    # raises for a configuration it refuses, returns the host commands it needs in any mode.
    preflight: Callable[[Config, StageMode], tuple[Need, ...]] = _no_preflight
    as_root: bool = False  # runs natively only as root
    reusable: bool = True  # mode skip reuses the last entry (False: nothing consumes it)

    @property
    def options(self) -> tuple[Option, ...]:
        return config.stage_options(self.name, self.mode_help, self.force_help)

    def mode(self, cfg: Config) -> StageMode:
        return cfg.mode(self.name)


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


def _initramfs_preflight(cfg: Config, mode: StageMode) -> tuple[Need, ...]:
    from captainos.stages import site

    if mode is StageMode.SKIP and site.wanted(cfg):
        # skip reuses the last image, which may have other images and keys, or none.
        raise CaptainError("--embed-images and --ssh-authorized-keys need the initramfs stage to run",
                           "drop --initramfs-mode skip, or drop the option")
    site.check(cfg)  # a bad list or key file: one line, before anything is built
    return ()


def _iso(cfg: Config, runner: Runner, entries: Entries) -> Path:
    from captainos.stages import iso

    return iso.build(cfg, runner, entries["kernel"] / "vmlinuz", entries["initramfs"] / "initramfs.cpio.zst")


def _publish_iso(cfg: Config, entry: Path, entries: Entries) -> None:
    from captainos.stages import kernel

    artifacts.publish(cfg.out_dir, entry / "captainos.iso", artifacts.iso_name(cfg.arch))
    artifacts.link_versioned(cfg.out_dir, cfg.arch, artifacts.iso_name(cfg.arch), kernel.release(entries["kernel"]))


def _iso_preflight(cfg: Config, mode: StageMode) -> tuple[Need, ...]:
    """--secure-boot, the one place it is checked: Debian's signed GRUB boots only a kernel
    Debian signed, and the signed shim and GRUB come from the archive, read on the host in any
    mode."""
    if mode is StageMode.SKIP or not cfg.secure_boot:
        return ()
    if cfg.kernel_source is not KernelSource.DEBIAN_IMAGE:
        raise CaptainError(f"--secure-boot needs Debian's signed kernel, not kernel source "
                           f"{cfg.kernel_source.value}", "add --kernel-source debian-image")
    return needs.DEBIAN_ARCHIVE


STAGES: tuple[Stage, ...] = (
    Stage("kernel", "build or fetch the kernel and its modules", (),
          lambda cfg: f"{cfg.arch.value}, source {cfg.kernel_source.value}",
          _kernel, _publish_kernel, _kernel_needs,
          mode_help="how the kernel stage runs", force_help="rebuild the kernel even when cached"),
    Stage("tools", "produce containerd, runc, nerdctl and the CNI plugins at their pinned versions", (),
          lambda cfg: f"{cfg.arch.value}, source {cfg.tools_source.value}",
          _tools, lambda cfg, entry, entries: None,
          lambda cfg: (needs.c_compiler(cfg.arch),
                       *(() if cfg.tools_source is ToolsSource.RELEASE else needs.TOOLS_GO)),
          mode_help="how the tools stage runs", force_help="redo the tools stage even when cached"),
    Stage("initramfs", "assemble the initramfs with mkosi (needs the kernel and tools stages)", ("kernel", "tools"),
          lambda cfg: f"mkosi, Debian trixie, {cfg.arch.value}",
          _initramfs, _publish_initramfs, _initramfs_needs,
          mode_help="how the initramfs (mkosi) stage runs", preflight=_initramfs_preflight,
          as_root=True),  # mkosi builds the image tree as root (device nodes, ownership)
    Stage("iso", "build the UEFI-bootable ISO from the kernel and initramfs", ("kernel", "initramfs"),
          lambda cfg: f"UEFI hybrid ISO, {cfg.arch.value}",
          _iso, _publish_iso, lambda cfg: needs.ISO,
          mode_help="how the ISO stage runs", preflight=_iso_preflight, reusable=False,
          flags=(flag("--cmdline", short_for="iso_cmdline", metavar="PARAMS",
                      help="same as --iso-cmdline: kernel parameters baked into the ISO"),)),
)


def names() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGES)


def by_name(name: str) -> Stage:
    return {stage.name: stage for stage in STAGES}[name]


def options() -> tuple[Option, ...]:
    """Every stage's own options, in table order: the CLI's, config.load's and summary's."""
    return tuple(option for stage in STAGES for option in stage.options)


def closure(name: str) -> tuple[Stage, ...]:
    """The stage and every stage it consumes, directly or not, in table order."""
    wanted = {name}
    for stage in reversed(STAGES):
        if stage.name in wanted:
            wanted.update(stage.inputs)
    return tuple(stage for stage in STAGES if stage.name in wanted)


def stages_of(verb: str) -> tuple[Stage, ...]:
    """The stages a verb runs: `build` all of them, a stage verb its closure, others none."""
    if verb == "build":
        return STAGES
    return closure(verb) if verb in names() else ()


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
    return _run(cfg, closure(name))


def _run(cfg: Config, stages: tuple[Stage, ...]) -> Entries:
    entries: Entries = {}
    for stage in stages:
        entry = run_stage(cfg, stage, {n: entries[n] for n in stage.inputs})
        if entry is not None:
            entries[stage.name] = entry
    return entries


def build(cfg: Config) -> None:
    """The whole build: every stage, then the checksums of out/."""
    _run(cfg, STAGES)
    with log.stage("checksums"):
        artifacts.write_checksums(cfg.out_dir, cfg.arch)


# One call per stage for callers that hold the entries already (tests, bench).
def _entry(cfg: Config, name: str, entries: Entries) -> Path:
    entry = run_stage(cfg, by_name(name), entries)
    assert entry is not None  # only the ISO, which these callers never skip, can give none
    return entry


def build_kernel(cfg: Config) -> Path:
    return _entry(cfg, "kernel", {})


def build_tools(cfg: Config) -> Path:
    return _entry(cfg, "tools", {})


def build_initramfs(cfg: Config, kernel_entry: Path, tools_entry: Path) -> Path:
    return _entry(cfg, "initramfs", {"kernel": kernel_entry, "tools": tools_entry})


def build_iso(cfg: Config, kernel_entry: Path, initramfs_entry: Path) -> Path | None:
    return run_stage(cfg, by_name("iso"), {"kernel": kernel_entry, "initramfs": initramfs_entry})
