"""The ISO stage: a UEFI-bootable hybrid ISO holding our kernel, initramfs and a GRUB menu.

Layout:
    /boot/vmlinuz, /boot/initramfs.cpio.zst
    /boot/grub/grub.cfg   the menu; its kernel line ends in Smee's 1024-byte magic string
    /.captainos           marker file GRUB searches for to find the ISO's filesystem
    EFI system partition (appended, GPT type EF00, also the El Torito EFI image):
        /EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI: GRUB built by grub-mkimage with a tiny
        embedded config that finds the ISO and loads /boot/grub/grub.cfg from it.

The magic string lives only in the uncompressed grub.cfg on the ISO 9660 filesystem, so a
server can replace it byte for byte (padding with spaces) without changing the file size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from captainos import __version__
from captainos.core import cache, pins
from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, run
from captainos.sources import debian

# Fixed timestamp for every file and the volume (reproducible output): the image's.
EPOCH = pins.SOURCE_DATE_EPOCH
VOLUME_ID = "CAPTAINOS"
MARKER = ".captainos"
FAT_SERIAL = "0x43505441"  # fixed FAT volume serial number ("CPTA"), for reproducibility
ESP_NAME = {Arch.AMD64: "BOOTX64.EFI", Arch.ARM64: "BOOTAA64.EFI"}
CONSOLES = {Arch.AMD64: "console=tty0 console=ttyS0,115200", Arch.ARM64: "console=tty0 console=ttyAMA0,115200"}
GRUB_DEB = {Arch.AMD64: "grub-efi-amd64-bin:amd64", Arch.ARM64: "grub-efi-arm64-bin:arm64"}


def grub_cfg(arch: Arch, cmdline: str, version: str = __version__) -> str:
    """The boot menu: short timeout, serial and graphical consoles, the patchable magic last."""
    # What GRUB's script reads as syntax (quotes, expansions, separators, redirections, blocks),
    # and "#" opening a word: the rest of the line, Smee's placeholder too, would be a comment.
    if any(c in cmdline for c in "\n\"'`$\\;{}|&<>") or any(word.startswith("#") for word in cmdline.split()):
        raise CaptainError(f"unsupported character in the ISO command line {cmdline!r}",
                           "kernel parameters are words separated by spaces; quotes, newlines, "
                           "; | & < > { } $ \\ and a word starting with # are not allowed")
    serial = ("serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n"
              if arch is Arch.AMD64 else "")
    params = " ".join(p for p in (CONSOLES[arch], cmdline.strip(), pins.ISO_MAGIC) if p)
    return (
        f"{serial}set timeout=3\nset default=0\n\n"
        f'menuentry "CaptainOS {version} ({arch.value})" {{\n'
        f"    linux /boot/vmlinuz {params}\n"
        f"    initrd /boot/initramfs.cpio.zst\n"
        f"}}\n"
    )


def embedded_cfg() -> str:
    """The config built into the EFI binary: find the ISO by its marker, load its menu."""
    return (f"search --no-floppy --set=root --file /{MARKER}\n"
            "set prefix=($root)/boot/grub\n"
            "configfile /boot/grub/grub.cfg\n")


def grub_mkimage_argv(arch: Arch, modules_dir: Path, output: Path, embedded: Path) -> list[str]:
    """GRUB as one EFI binary with the embedded config and the modules it needs linked in.

    grub-mkimage (not grub-mkstandalone, whose memdisk tar carries the build time) so that
    the same inputs give the same bytes.
    """
    modules = ["part_gpt", "part_msdos", "iso9660", "fat", "search", "search_fs_file", "configfile", "linux",
               "normal", "echo", "test", "serial", "efi_gop", "all_video", "gzio"]
    if arch is Arch.ARM64:
        modules.remove("serial")
    return ["grub-mkimage", "--format", arch.efi_target(), "--directory", str(modules_dir),
            "--output", str(output), "--prefix", "/boot/grub", "--config", str(embedded), *modules]


def xorriso_argv(root: Path, esp: Path, output: Path) -> list[str]:
    """A hybrid ISO: the ESP appended as a GPT partition and used as the El Torito EFI image."""
    return ["xorriso", "-as", "mkisofs", "-quiet", "-iso-level", "3", "-rational-rock", "-joliet",
            "-volid", VOLUME_ID, "-append_partition", "2", "0xef", str(esp), "-appended_part_as_gpt",
            "-e", "--interval:appended_partition_2:all::", "-no-emul-boot",
            "--modification-date=" + _xorriso_date(), "-o", str(output), str(root)]


def _xorriso_date() -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(EPOCH, dt.UTC).strftime("%Y%m%d%H%M%S00")


def grub_modules(cfg: Config, runner: Runner) -> Path:
    """GRUB's EFI modules for the target arch: the host's, or Debian's package unpacked once."""
    host_dir = Path("/usr/lib/grub") / cfg.arch.efi_target()
    if host_dir.is_dir():
        return host_dir

    def fetch(work: Path) -> None:
        # apt verifies the package against the archive's signed indices.
        runner.run(["apt-get", "-o", "APT::Sandbox::User=root", "download", GRUB_DEB[cfg.arch]], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise CaptainError(f"apt-get download {GRUB_DEB[cfg.arch]} gave no package",
                               f"enable the architecture: dpkg --add-architecture {cfg.arch.value} && apt-get update")
        runner.run(["dpkg-deb", "-x", debs[0], work / "root"])
        debs[0].unlink()

    entry = cache.cached(cfg.cache_dir, "grub", cfg.arch.value, {"package": GRUB_DEB[cfg.arch],
                         "grub": _grub_version()}, force=cfg.force("iso"), produce=fetch)
    found = entry / "root" / "usr" / "lib" / "grub" / cfg.arch.efi_target()
    if not found.is_dir():
        raise CaptainError(f"{GRUB_DEB[cfg.arch]} has no {cfg.arch.efi_target()} modules")
    return found


def _grub_version() -> str:
    result = run(["dpkg-query", "-W", "-f=${Version}", "grub-common"], capture=True, capture_stderr=True,
                 check=False)
    return result.stdout.strip() or "unknown"


def make_esp(runner: Runner, files: dict[str, Path], output: Path) -> None:
    """A FAT image just big enough for EFI/BOOT/<files>, with fixed serial and dates."""
    size_kib = sum(f.stat().st_size for f in files.values()) // 1024 + 512
    with output.open("wb") as handle:
        handle.truncate(size_kib * 1024)
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(EPOCH)}
    runner.run(["mformat", "-i", output, "-N", FAT_SERIAL.removeprefix("0x"), "-v", "CAPTAINOS_E", "::"], env=env)
    runner.run(["mmd", "-i", output, "::/EFI", "::/EFI/BOOT"], env=env)
    for name, source in sorted(files.items()):
        staged = output.parent / f"esp-{name}"
        shutil.copyfile(source, staged)
        os.utime(staged, (EPOCH, EPOCH))
        runner.run(["mcopy", "-m", "-i", output, staged, f"::/EFI/BOOT/{name}"], env=env)
        staged.unlink()


SIGNED_DEBS = {Arch.AMD64: ("shim-signed", "grub-efi-amd64-signed"),
               Arch.ARM64: ("shim-signed", "grub-efi-arm64-signed")}
SIGNED_FILES = {
    # ESP name: path in the unpacked packages. shim (signed by the UEFI CA) loads grub<arch>.efi
    # from its own directory; Debian's signed CD GRUB finds the ISO by /.disk/info.
    Arch.AMD64: {"BOOTX64.EFI": "usr/lib/shim/shimx64.efi.signed",
                 "grubx64.efi": "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"},
    Arch.ARM64: {"BOOTAA64.EFI": "usr/lib/shim/shimaa64.efi.signed",
                 "grubaa64.efi": "usr/lib/grub/arm64-efi-signed/gcdaa64.efi.signed"},
}


def _signed_unpacked(cfg: Config, runner: Runner) -> Path:
    """Debian's signed shim and GRUB for cfg.arch, from the signed archive (the suite the image
    and its signed kernel come from), unpacked once per pair of package digests."""
    debs = [debian.package(name, cfg.arch.value, cache_dir=cfg.cache_dir) for name in SIGNED_DEBS[cfg.arch]]

    def produce(work: Path) -> None:
        for deb in debs:
            debian.extract(runner, deb, work / "root")

    parts = {"packages": {deb.name: deb.parent.name for deb in debs}}  # downloads/<sha256>/<file>
    return cache.cached(cfg.cache_dir, "secureboot", cfg.arch.value, parts, force=cfg.force("iso"),
                        produce=produce) / "root"


def _efi_files(cfg: Config, runner: Runner, work: Path, modules: Path | None) -> dict[str, Path]:
    """The files of EFI/BOOT on the ESP: our GRUB, or signed shim + signed GRUB."""
    if cfg.secure_boot:
        unpacked = _signed_unpacked(cfg, runner)
        files = {name: unpacked / rel for name, rel in SIGNED_FILES[cfg.arch].items()}
        for name, path in files.items():
            if not path.is_file():
                raise CaptainError(f"{' and '.join(SIGNED_DEBS[cfg.arch])} hold no {path.name} for {name}")
        return files
    assert modules is not None
    embedded = work / "embedded.cfg"
    embedded.write_text(embedded_cfg())
    efi = work / ESP_NAME[cfg.arch]
    runner.run(grub_mkimage_argv(cfg.arch, modules, efi, embedded))
    return {ESP_NAME[cfg.arch]: efi}


def build(cfg: Config, runner: Runner, vmlinuz: Path, initramfs: Path) -> Path:
    for path in (vmlinuz, initramfs):
        if not path.is_file():
            raise CaptainError(f"missing ISO input {path}", "build the kernel and initramfs first")
    menu = grub_cfg(cfg.arch, cfg.iso_cmdline)
    modules = None if cfg.secure_boot else grub_modules(cfg, runner)
    parts = {"vmlinuz": cache.sha256_file(vmlinuz), "initramfs": cache.sha256_file(initramfs), "menu": menu,
             "grub": _grub_version(), "code": cache.code_digest(__file__), "arch": cfg.arch.value,
             "secure_boot": cfg.secure_boot, "epoch": EPOCH}

    def produce(work: Path) -> None:
        root = work / "root"
        (root / "boot" / "grub").mkdir(parents=True)
        shutil.copyfile(vmlinuz, root / "boot" / "vmlinuz")
        shutil.copyfile(initramfs, root / "boot" / "initramfs.cpio.zst")
        (root / "boot" / "grub" / "grub.cfg").write_text(menu)
        (root / MARKER).write_text(f"CaptainOS {__version__} {cfg.arch.value}\n")
        (root / ".disk").mkdir()
        (root / ".disk" / "info").write_text(f"CaptainOS {__version__} {cfg.arch.value}\n")
        efi_dir = work / "efi"
        efi_dir.mkdir()
        efi_files = _efi_files(cfg, runner, efi_dir, modules)
        for path in [*root.rglob("*"), root]:
            os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
        esp = work / "efiboot.img"
        make_esp(runner, efi_files, esp)
        iso = work / "captainos.iso.partial"
        runner.run(xorriso_argv(root, esp, iso), env={"SOURCE_DATE_EPOCH": str(EPOCH)})
        check_magic(iso)
        iso.rename(work / "captainos.iso")
        for scratch in (root, efi_dir, esp):
            cache.remove(scratch)

    return cache.cached(cfg.cache_dir, "iso", cfg.arch.value, parts, force=cfg.force("iso"), produce=produce)


def check_magic(iso: Path) -> None:
    """The placeholder must appear exactly once, or a patcher would miss it or patch twice."""
    data = iso.read_bytes()
    count = data.count(pins.ISO_MAGIC.encode())
    if count != 1:
        raise CaptainError(f"the ISO holds the command-line placeholder {count} times, expected once")
