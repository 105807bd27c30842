"""The build host: prerequisite checks before any work, `setup`, `shell` and `clean`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from captainos import cache, log, pins
from captainos.config import REPO, Arch, Config, KernelSource, StageMode, ToolsSource
from captainos.errors import CaptainError
from captainos.run import base_env, run

TOOLS_DIR = REPO / ".tools"


@dataclass(frozen=True)
class Need:
    """A host command a stage needs, what for, and the Debian package that provides it."""

    command: str
    purpose: str
    package: str
    install: str = ""  # how to get it when apt's package is not enough

    def how(self) -> str:
        return self.install or f"apt-get install {self.package}"


KERNEL_COMPILE = (
    Need("make", "kernel compile", "make"), Need("gcc", "kernel compile", "gcc"),
    Need("flex", "kernel compile", "flex"), Need("bison", "kernel compile", "bison"),
    Need("bc", "kernel compile", "bc"), Need("perl", "kernel compile", "perl"),
    Need("depmod", "kernel module index", "kmod"), Need("xz", "kernel source unpacking", "xz-utils"),
    Need("dpkg-deb", "unpacking Debian's linux-source", "dpkg"),
    Need("gpgv", "Debian archive signature check", "gpgv"),
)
KERNEL_PACKAGES = (Need("dpkg-deb", "unpacking Debian packages", "dpkg"),
                   Need("gpgv", "Debian archive signature check", "gpgv"),
                   Need("depmod", "kernel module index", "kmod"))
TOOLS_GO = (Need("go", "building containerd/runc/nerdctl/CNI from Go modules", "golang-go",
                 install=f"./build.py setup (the pinned Go {pins.GO_TOOLCHAIN.version} from the Go module proxy; "
                         f"Debian's golang-go is older than the {pins.GO_TOOLCHAIN.minimum} the modules need)"),
            Need("gcc", "runc (cgo, libseccomp)", "gcc"), Need("pkg-config", "runc's libseccomp lookup", "pkg-config"))
INITRAMFS = (Need("python3", "running mkosi", "python3"), Need("zstd", "compressing the initramfs", "zstd"),
             Need("cpio", "writing the initramfs", "cpio"), Need("apt-get", "mkosi's Debian bootstrap", "apt"),
             Need("dpkg-deb", "unpacking Debian packages", "dpkg"))
ISO = (Need("xorriso", "writing the ISO", "xorriso"), Need("mformat", "the EFI system partition image", "mtools"),
       Need("grub-mkstandalone", "the GRUB EFI image", "grub-common"))
QEMU = {Arch.AMD64: Need("qemu-system-x86_64", "booting images", "qemu-system-x86"),
        Arch.ARM64: Need("qemu-system-aarch64", "booting images", "qemu-system-arm")}
DOCKER = Need("docker", "the docker stage mode", "docker.io")
LAB = (Need("ip", "the lab's network namespace, bridge and taps", "iproute2"),
       Need("docker-registry", "the lab's registry", "docker-registry"),
       Need("skopeo", "pushing the agent and action images", "skopeo"),
       Need("openssl", "the lab's certificates", "openssl"),
       Need("htpasswd", "the lab's authenticated registry", "apache2-utils"),
       Need("qemu-img", "the VMs' disks", "qemu-utils"))

# What `setup` installs: every package above plus the libraries the builds link against.
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
)


def needs(cfg: Config, verb: str) -> list[Need]:
    """The commands a verb needs with this configuration."""
    every = ("kernel", "tools", "initramfs", "iso")
    stages = {"build": every, "iso": every, "initramfs": every[:3]}.get(verb, (verb,))
    modes = {"kernel": cfg.kernel_mode, "tools": cfg.tools_mode, "initramfs": cfg.initramfs_mode,
             "iso": cfg.iso_mode}
    found: list[Need] = []
    for stage in stages:
        mode = modes.get(stage, StageMode.NATIVE)
        if mode is StageMode.SKIP:
            continue
        if mode is StageMode.DOCKER:
            found.append(DOCKER)
            continue
        if stage == "kernel":
            found += KERNEL_PACKAGES if cfg.kernel_source is KernelSource.DEBIAN_IMAGE else KERNEL_COMPILE
            if cfg.kernel_source is not KernelSource.DEBIAN_IMAGE and not cfg.arch.is_host():
                found.append(Need(f"{cfg.arch.cross_compile()}gcc", "cross-compiling the kernel",
                                  f"gcc-{cfg.arch.uname()}-linux-gnu"))
        elif stage == "tools" and cfg.tools_source is not ToolsSource.RELEASE:
            found += TOOLS_GO
        elif stage == "initramfs":
            found += INITRAMFS
            if cfg.embed_images is not None:
                found.append(Need("skopeo", "pulling the embedded images (--embed-images)", "skopeo"))
        elif stage == "iso":
            found += ISO
        elif stage == "publish":
            found.append(Need("skopeo", "pushing the image (publish --to)", "skopeo"))
        elif stage == "qemu-test":
            found.append(QEMU[cfg.arch])
        elif stage == "lab":
            found += [*LAB, QEMU[cfg.arch], *TOOLS_GO[:1]]
    return found


def needs_root(cfg: Config, verb: str) -> bool:
    """mkosi builds the image tree as root (device nodes, ownership)."""
    return verb in ("build", "initramfs", "iso") and cfg.initramfs_mode is StageMode.NATIVE


def check(cfg: Config, verb: str) -> None:
    """Fail before any work: one line per missing tool, with what installs it."""
    if (cfg.secure_boot and verb in ("build", "iso") and cfg.iso_mode is not StageMode.SKIP
            and cfg.kernel_source is not KernelSource.DEBIAN_IMAGE):
        # Debian's signed GRUB boots only a kernel Debian signed: anything else fails at boot.
        raise CaptainError(f"--secure-boot needs Debian's signed kernel, not kernel source "
                           f"{cfg.kernel_source.value}", "add --kernel-source debian-image")
    if verb in ("build", "initramfs", "iso"):
        from captainos import site

        if cfg.initramfs_mode is StageMode.SKIP and site.wanted(cfg):
            # skip reuses the last image, which may have other images and keys, or none.
            raise CaptainError("--embed-images and --ssh-authorized-keys need the initramfs stage to run",
                               "drop --initramfs-mode skip, or drop the option")
        site.check(cfg)  # a bad list or key file: one line, before anything is built
    if needs_root(cfg, verb) and os.geteuid() != 0:
        raise CaptainError(f"'{verb}' in native mode must run as root (mkosi builds the image as root)",
                           "run it with sudo, or use --initramfs-mode docker")
    from captainos import golang

    path = f"{base_env()['PATH']}:{golang.GO_FALLBACK.parent}"  # setup's Go need not be on PATH
    wanted = list(dict.fromkeys(needs(cfg, verb)))
    missing = [n for n in wanted if shutil.which(n.command, path=path) is None]
    for need in missing:
        log.error(f"missing {need.command}: needed for {need.purpose}; install: {need.how()}")
    if missing:
        raise CaptainError(f"{len(missing)} prerequisite(s) missing", "or run './build.py setup' as root")
    if any(n.command == "go" for n in wanted):
        golang.go_binary()  # present, but is it the pinned version? One line if not.
    if verb in ("build", "initramfs", "iso") and cfg.initramfs_mode is StageMode.NATIVE and not mkosi_dir().is_dir():
        raise CaptainError(f"mkosi {pins.MKOSI.version} is not unpacked in {TOOLS_DIR}",
                           "run './build.py setup' (it downloads and verifies Debian's mkosi package)")


def mkosi_dir() -> Path:
    return TOOLS_DIR / f"mkosi-{pins.MKOSI.version}"


def mkosi_pythonpath() -> Path:
    return mkosi_dir() / "usr" / "lib" / "python3" / "dist-packages"


def setup(cfg: Config) -> None:
    """Install apt prerequisites and the pinned mkosi into .tools/ (Debian/Ubuntu, root)."""
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
        install_mkosi(pins.MKOSI, mkosi_dir())
    with log.stage("setup", f"Go {pins.GO_TOOLCHAIN.version}"):
        install_go(cfg)
    register_binfmt()


def install_go(cfg: Config) -> None:
    """The pinned Go toolchain in /usr/local/go, unless a `go` of the pinned version is already
    there: builds use no other (Debian's golang-go, 1.19 in bookworm and 1.24 in trixie, is
    older than the modules need anyway)."""
    from captainos import golang

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
        result = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                                capture_output=True, text=True, check=False)
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


def install_mkosi(pin: pins.DebPin, target: Path, mirror: str = pins.DEBIAN_MIRROR) -> None:
    """Download the pinned .deb, verify its sha256, unpack it, and rename it into place."""
    if (target / cache.STAMP).is_file():
        log.info(f"    mkosi {pin.version} already in {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mkosi-") as tmp:
        deb = Path(tmp) / Path(pin.filename).name
        url = f"{mirror}/{pin.filename}"
        log.info(f"    downloading {url}")
        with urllib.request.urlopen(url, timeout=60) as response, deb.open("wb") as sink:
            shutil.copyfileobj(response, sink)
        digest = cache.sha256_file(deb)
        if digest != pin.sha256:
            raise CaptainError(f"checksum mismatch for {deb.name}: got {digest}, pinned {pin.sha256}",
                               "the mirror served a different file; nothing was installed")
        unpacked = Path(tmp) / "root"
        run(["dpkg-deb", "-x", deb, unpacked])
        (unpacked / cache.STAMP).write_text(pin.sha256 + "\n")
        cache.remove(target)
        os.rename(unpacked, target)
    log.info(f"    mkosi {pin.version} unpacked in {target}")


def shell(cfg: Config) -> None:
    """An interactive shell: in the builder container, or on the host with the build env."""
    if cfg.initramfs_mode is StageMode.DOCKER:
        from captainos import docker
        from captainos.run import docker_run_argv

        argv = docker_run_argv(docker.ensure_builder(cfg), ["bash"], env={}, mounts=(REPO, cfg.cache_dir),
                               workdir=REPO, interactive=True)
        os.execvpe(argv[0], argv, base_env())
    env = base_env({"PYTHONPATH": str(mkosi_pythonpath()), "CAPTAINOS_ARCH": cfg.arch.value,
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
