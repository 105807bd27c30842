"""The host commands the stages and verbs need, what for, and the Debian package of each.

`setup` installs them; `host.check` looks each one up before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from captainos.core import pins
from captainos.core.config import Arch


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
def c_compiler(arch: Arch) -> Need:
    """Our own programs (programs/) are C: the host's gcc, or the cross compiler for arch."""
    if arch.is_host():
        return Need("gcc", "compiling reboot-guard", "gcc")
    package = f"gcc-{arch.uname()}-linux-gnu".replace("_", "-")
    return Need(f"{arch.cross_compile()}gcc", "compiling reboot-guard", package)


TOOLS_GO = (Need("go", "building containerd/runc/nerdctl/CNI from Go modules", "golang-go",
                 install=f"./build.py setup (the pinned Go {pins.GO_TOOLCHAIN.version} from the Go module proxy; "
                         f"Debian's golang-go is older than the {pins.GO_TOOLCHAIN.minimum} the modules need)"),
            Need("gcc", "runc (cgo, libseccomp)", "gcc"), Need("pkg-config", "runc's libseccomp lookup", "pkg-config"))
INITRAMFS = (Need("python3", "running mkosi", "python3"), Need("zstd", "compressing the initramfs", "zstd"),
             Need("cpio", "writing the initramfs", "cpio"), Need("apt-get", "mkosi's Debian bootstrap", "apt"),
             Need("dpkg-deb", "unpacking Debian packages", "dpkg"))
# Reading Debian's signed archive (debian.package) happens on the host in every stage mode.
DEBIAN_ARCHIVE = (Need("gpgv", "Debian archive signature check", "gpgv"),
                  Need("dpkg", "Debian version order", "dpkg"))
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
       Need("qemu-img", "the VMs' disks", "qemu-utils"),
       Need("sfdisk", "the hub template's disk image", "fdisk"),
       Need("mkfs.ext4", "the hub template's disk image", "e2fsprogs"),
       Need("git", "the hub actions' source", "git"))
