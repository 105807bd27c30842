"""The build host: prerequisite checks before any work, `setup`, `shell` and `clean`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import REPO, Arch, Config, StageMode
from captainos.core.errors import CaptainError
from captainos.core.needs import DOCKER, LAB, QEMU, TOOLS_GO, Need
from captainos.core.run import base_env, run
from captainos.sources import mkosi
from captainos.sources.mkosi import TOOLS_DIR

# What `setup` installs: every package core/needs.py names but docker.io (the docker mode's engine is the
# operator's) and golang-go (setup installs the pinned Go instead), plus the libraries the builds link against.
APT_PACKAGES = (
    "make", "gcc", "flex", "bison", "bc", "perl", "kmod", "xz-utils", "libelf-dev", "libssl-dev",
    "dpkg", "gpgv", "debian-archive-keyring", "pkg-config", "libseccomp-dev", "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross", "python3", "zstd", "cpio", "apt", "systemd-container", "bubblewrap",
    "xorriso", "mtools", "grub-common", "grub-efi-amd64-bin", "grub-efi-arm64-bin", "ovmf", "qemu-efi-aarch64",
    "qemu-system-x86", "qemu-system-arm", "qemu-utils", "openssl", "skopeo", "docker-registry",
    "apache2-utils", "busybox-static", "shellcheck", "file", "curl", "ca-certificates", "iproute2",
    # ssh, ssh-keygen and ssh-keyscan: the SSH tests log into a VM.
    "openssh-client",
    # Runs the other architecture's binaries for the tools stage's --version checks.
    "qemu-user-static",
    # The lab's hub template: its disk image (GPT, ext4 from a directory) and the hub actions' source.
    "fdisk", "e2fsprogs", "git",
    # The lab's Helm-chart file server (Debian's nginx, run with the chart's configuration).
    "nginx",
    # The test environment (.venv): Debian's python3 refuses pip installs into the system.
    "python3-venv",
    # The image's forwarding policy (forward.nft), loaded in a test's own network namespaces.
    "nftables",
    # The lab's DNS server, and the DHCP and DNS server of a VM's second network.
    "dnsmasq-base",
)


def needs(cfg: Config, verb: str) -> list[Need]:
    """The commands a verb needs with this configuration: for each stage it runs (the stage
    table's rows) those of its preflight, and its own when native or docker's; then the verb's.
    A configuration a stage refuses raises here, before any work."""
    from captainos.stages import pipeline

    found: list[Need] = []
    for stage in pipeline.stages_of(verb):
        mode = stage.mode(cfg)
        found += stage.preflight(cfg, mode)
        if mode is StageMode.DOCKER:
            found.append(DOCKER)
        elif mode is StageMode.NATIVE:
            found += stage.requires(cfg)
    if verb == "publish":
        found.append(Need("skopeo", "pushing the image (publish --to)", "skopeo"))
    elif verb == "qemu-test":
        found.append(QEMU[cfg.arch])
    elif verb == "lab":
        found += [*LAB, QEMU[cfg.arch], *TOOLS_GO[:1]]
    return found


def root_stages(cfg: Config, verb: str) -> list[str]:
    """The verb's stages that run natively only as root (mkosi builds the image tree as root)."""
    from captainos.stages import pipeline

    return [s.name for s in pipeline.stages_of(verb) if s.as_root and s.mode(cfg) is StageMode.NATIVE]


def check(cfg: Config, verb: str) -> None:
    """Fail before any work: a configuration a stage refuses, then one line per missing tool,
    with what installs it."""
    wanted = list(dict.fromkeys(needs(cfg, verb)))
    as_root = root_stages(cfg, verb)
    if as_root and os.geteuid() != 0:
        raise CaptainError(f"'{verb}' in native mode must run as root (mkosi builds the image as root)",
                           f"run it with sudo, or use --{as_root[0]}-mode docker")
    from captainos.sources import golang

    path = f"{base_env()['PATH']}:{golang.GO_FALLBACK.parent}"  # setup's Go need not be on PATH
    missing = [n for n in wanted if shutil.which(n.command, path=path) is None]
    for need in missing:
        log.error(f"missing {need.command}: needed for {need.purpose}; install: {need.how()}")
    if missing:
        raise CaptainError(f"{len(missing)} prerequisite(s) missing", "or run './build.py setup' as root")
    if any(n.command == "go" for n in wanted):
        golang.go_binary()  # present, but is it the pinned version? One line if not.
    if "initramfs" in as_root and not mkosi.directory().is_dir():  # that stage is mkosi's
        raise CaptainError(f"mkosi {pins.MKOSI.version} is not unpacked in {TOOLS_DIR}",
                           "run './build.py setup' (it downloads and verifies Debian's mkosi package)")


def setup(cfg: Config) -> None:
    """Install apt prerequisites, the pinned mkosi into .tools/, the pinned Go, and the test
    environment .venv (Debian/Ubuntu, root)."""
    if os.geteuid() != 0:
        raise CaptainError("setup installs packages and must run as root", "run: sudo ./build.py setup")
    with log.stage("setup", "apt packages"):
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        # The other architecture's packages (GRUB's EFI modules for its ISO) are fetched with
        # `apt-get download`, which needs that architecture in dpkg's list.
        for arch in Arch:
            if not arch.is_host():
                run(["dpkg", "--add-architecture", arch.value])
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], env=env)
    with log.stage("setup", f"mkosi {pins.MKOSI.version}"):
        mkosi.install(pins.MKOSI, mkosi.directory())
    with log.stage("setup", f"Go {pins.GO_TOOLCHAIN.version}"):
        install_go(cfg)
    register_binfmt()
    with log.stage("setup", f"the test environment {VENV.name}"):
        make_venv()


VENV = REPO / ".venv"  # the test command is .venv/bin/pytest


def make_venv(venv: Path = VENV) -> None:
    """A venv with this checkout installed in it (editable) with the dev and lab extras: what
    the test suite imports. Debian's own python3 refuses `pip install` outside a venv (PEP 668).
    The install is redone only when pyproject.toml changed."""
    python = venv / "bin" / "python"
    stamp = venv / ".captainos-pyproject.sha256"
    want = cache.sha256_file(REPO / "pyproject.toml")
    if not python.exists():
        run([sys.executable, "-m", "venv", venv])
    if stamp.is_file() and stamp.read_text().strip() == want:
        log.info(f"    {venv} is up to date")
        return
    run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f"{REPO}[dev,lab]"])
    cache.atomic_write(stamp, want + "\n")
    log.info(f"    {venv}: this checkout with its dev and lab extras; tests: {venv.name}/bin/pytest")


def install_go(cfg: Config) -> None:
    """The pinned Go toolchain in /usr/local/go, unless a `go` of the pinned version is already
    there: builds use no other (Debian's golang-go, 1.19 in bookworm and 1.24 in trixie, is
    older than the modules need anyway)."""
    from captainos.sources import golang

    try:
        found = golang.go_binary()
        log.info(f"    {found} is Go {golang.installed_version(found)}: the pinned version")
        return
    except CaptainError:
        pass
    host = next(arch for arch in Arch if arch.is_host())
    golang.install_toolchain(host, cfg.cache_dir)
    log.info(f"    Go {pins.GO_TOOLCHAIN.version} installed in {golang.GO_ROOT} "
             f"(add {golang.GO_FALLBACK.parent} to PATH)")


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def register_binfmt() -> None:
    """Let the other architecture's binaries run through qemu-user (mkosi runs the arm64
    image's package scripts that way). Idempotent; skipped where binfmt_misc is unavailable."""
    if not (BINFMT_DIR / "register").exists():
        result = run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR], capture=True, capture_stderr=True,
                     check=False)
        if result.returncode != 0:
            log.warn(f"binfmt_misc cannot be mounted ({result.stderr.strip()}): no foreign-arch image builds")
            return
    for arch in Arch:
        name = f"qemu-{arch.uname()}"
        rule = Path("/usr/lib/binfmt.d") / f"{name}.conf"
        if arch.is_host() or (BINFMT_DIR / name).exists() or not rule.is_file():
            continue
        line = next(x for x in rule.read_text().splitlines() if x.startswith(":"))
        (BINFMT_DIR / "register").write_text(line)
        log.info(f"    registered {name} in binfmt_misc")


def shell(cfg: Config) -> None:
    """An interactive shell: in the builder container, or on the host with the build env."""
    if cfg.mode("initramfs") is StageMode.DOCKER:
        from captainos.core import docker
        from captainos.core.run import docker_run_argv

        argv = docker_run_argv(docker.ensure_builder(cfg), ["bash"], env={}, mounts=(REPO, cfg.cache_dir),
                               workdir=REPO, interactive=True)
        os.execvpe(argv[0], argv, base_env())
    env = base_env({"PYTHONPATH": str(mkosi.pythonpath()), "CAPTAINOS_ARCH": cfg.arch.value,
                    "PS1": f"(captainos {cfg.arch.value}) \\w# "})
    log.info(f"build environment shell (mkosi: python3 -m mkosi; arch {cfg.arch.value}); exit to leave")
    os.chdir(REPO)
    os.execvpe("bash", ["bash", "--norc", "-i"], env)


def clean(cfg: Config, everything: bool) -> None:
    targets = [cfg.out_dir, REPO / "build"]
    if everything:
        targets += [cfg.cache_dir, TOOLS_DIR]
    for target in targets:
        if target.exists():
            log.info(f"    removing {target}")
            cache.remove(target)
