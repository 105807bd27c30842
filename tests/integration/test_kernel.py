"""The kernel stage for real: Debian's prebuilt image (a download) and a compile from
Debian's linux-source, each booted under QEMU with a busybox initramfs that reports what
the kernel sees (command line length, /proc/config.gz, module loading); and the compiled
kernel under the real image's self-test."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.config import Accel, Arch, Config
from captainos.core.run import Runner
from captainos.lab.qemu import Guest, Machine
from captainos.sources import debian
from captainos.stages import cpio, image, kernel, kernel_config, kernel_patch, pipeline

BUSYBOX = Path("/bin/busybox")
# Long enough to overflow the stock 2048-byte x86 command line, as Smee's ISO patcher does.
PAD = "captainos.pad=" + "x" * 3000

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "UNAME: $(/bin/busybox uname -r)"
echo "CMDLINE-LEN: $(/bin/busybox wc -c < /proc/cmdline)"
echo "ENV-COUNT: $(/bin/busybox env | /bin/busybox grep -c '^capenv')"
if [ -r /proc/config.gz ]; then
  echo "IKCONFIG: $(/bin/busybox zcat /proc/config.gz | /bin/busybox grep -c '^CONFIG_IKCONFIG_PROC=y')"
fi
if /bin/busybox modprobe dummy && /bin/busybox grep -q '^dummy ' /proc/modules; then
  echo "MODULE: loaded"
else
  echo "MODULE: failed"
fi
echo "BOOT-DONE"
/bin/busybox reboot -f
"""


def env_words(count: int) -> str:
    """Parameters the kernel does not know, with "=" and no ".": each becomes a variable of /init."""
    return " ".join(f"capenv{i}=x" for i in range(count))


def busybox_initramfs(entry: Path, dest: Path, busybox: Path = BUSYBOX) -> Path:
    """A zstd CPIO (the compression CaptainOS uses) with busybox, /init, and the entry's
    dummy module plus the module indexes."""
    info = json.loads((entry / "kernel.json").read_text())
    release = info["version"]
    moddir = entry / "modules" / "usr" / "lib" / "modules" / release
    entries: list[tuple[str, int, bytes, int]] = [
        ("dev", 0o40755, b"", 0), ("dev/console", 0o20600, b"", (5 << 8) | 1),
        ("bin", 0o40755, b"", 0), ("bin/busybox", 0o100755, busybox.read_bytes(), 0),
        ("init", 0o100755, INIT.encode(), 0),
    ]
    dirs = {"lib", "lib/modules", f"lib/modules/{release}"}
    files = [p for p in moddir.rglob("*") if p.is_file() and (p.name.startswith("modules.") or
                                                             kernel_config.module_name(p.name) == "dummy")]
    for path in files:
        rel = f"lib/modules/{release}/{path.relative_to(moddir).as_posix()}"
        parent = rel.rsplit("/", 1)[0]
        while parent not in dirs:
            dirs.add(parent)
            parent = parent.rsplit("/", 1)[0]
        entries.append((rel, 0o100644, path.read_bytes(), 0))
    entries[5:5] = [(d, 0o40755, b"", 0) for d in sorted(dirs)]
    raw = dest.with_suffix("")
    raw.write_bytes(cpio.write(entries))
    Runner().run(["zstd", "-q", "-f", "--rm", raw, "-o", dest])
    return dest


def boot(entry: Path, tmp_path: Path, append: str = "", arch: Arch = Arch.AMD64,
         busybox: Path = BUSYBOX) -> dict[str, str]:
    """Boot the entry's vmlinuz under TCG; the KEY: value lines /init printed."""
    initrd = busybox_initramfs(entry, tmp_path / "initramfs.cpio.zst", busybox)
    machine = Machine(arch, kernel=entry / "vmlinuz", initrd=initrd, append=f"panic=-1 {append}".strip(),
                      mem="512M", smp=1, accel=Accel.TCG)
    with Guest(machine, workdir=tmp_path / "qemu") as guest:
        guest.wait_for(r"^BOOT-DONE", timeout=600 if arch is Arch.ARM64 else 240)
        text = guest.serial()
    return dict(line.split(": ", 1) for line in text.replace("\r", "").splitlines()
                if line.split(": ", 1)[0] in {"UNAME", "CMDLINE-LEN", "ENV-COUNT", "IKCONFIG", "MODULE"})


def _cfg(source: str, arch: Arch = Arch.AMD64) -> Config:
    env = {"ARCH": arch.value, "KERNEL_SOURCE": source}
    if "CAPTAINOS_CACHE" in os.environ:
        env["CAPTAINOS_CACHE"] = os.environ["CAPTAINOS_CACHE"]
    return config.load(env=env)


needs_tools = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or not BUSYBOX.is_file(),
                                 reason="needs qemu-system-x86 and busybox-static")


@pytest.mark.integration
@needs_tools
def test_debian_image_amd64(tmp_path: Path) -> None:
    entry = kernel.build(_cfg("debian-image"), Runner())
    info = json.loads((entry / "kernel.json").read_text())
    assert info["source"] == "debian-image" and info["version"].endswith("-amd64")
    assert (entry / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"
    moddir = entry / "modules" / "usr" / "lib" / "modules" / info["version"]
    kept = {kernel_config.module_name(p.name) for p in moddir.rglob("*.ko*")}
    assert {"overlay", "br_netfilter", "bridge", "virtio_net", "nf_tables", "dummy"} <= kept
    assert "snd" not in kept and "amdgpu" not in kept  # trimmed: no sound, no GPU
    assert (moddir / "modules.dep").is_file()
    seen = boot(entry, tmp_path, append=env_words(31))
    assert seen["UNAME"] == info["version"]
    assert seen["MODULE"] == "loaded", seen
    assert seen["ENV-COUNT"] == "31", seen  # the most Debian's kernel takes (README)


@pytest.mark.integration
@needs_tools
def test_debian_kernel_panics_past_31_boot_env_vars(tmp_path: Path) -> None:
    """The limit the README states for Debian's kernel is real: one more word is a panic."""
    entry = kernel.build(_cfg("debian-image"), Runner())
    initrd = busybox_initramfs(entry, tmp_path / "initramfs.cpio.zst")
    machine = Machine(Arch.AMD64, kernel=entry / "vmlinuz", initrd=initrd, append=f"panic=-1 {env_words(32)}",
                      mem="512M", smp=1, accel=Accel.TCG)
    with Guest(machine, workdir=tmp_path / "qemu") as guest:
        guest.wait_for(r"Too many boot env vars|^BOOT-DONE", timeout=240)
        assert "Too many boot env vars" in guest.serial(), guest.tail()


@pytest.mark.kernel_compile
@needs_tools
def test_compile_from_debian_source_amd64(tmp_path: Path) -> None:
    entry = kernel.build(_cfg("debian-source"), Runner())
    info = json.loads((entry / "kernel.json").read_text())
    assert info["source"] == "debian-source" and info["version"].endswith("-captainos")
    assert info["command_line_size"] == 4096
    assert kernel_patch.bzimage_cmdline_size(entry / "vmlinuz") == 4095
    resolved = kernel_config.parse_config((entry / "config").read_text())
    assert resolved["CONFIG_IKCONFIG_PROC"] == "y" and resolved["CONFIG_RD_ZSTD"] == "y"
    assert [resolved.get(o, "n") for o in ("CONFIG_DRM", "CONFIG_SOUND", "CONFIG_WLAN")] == ["n", "n", "n"]
    assert (entry / "vmlinuz").stat().st_size < 16 * 1024 * 1024
    assert info["init_env_arg_limit"] == 128
    assert info["initramfs_options"] == "size=90%"  # the unpack tmpfs, patched in fs/namespace.c
    assert resolved["CONFIG_SWAP"] == "y" and resolved["CONFIG_ZRAM"] == "y"  # captainos-zram.service
    seen = boot(entry, tmp_path, append=f"{PAD} {env_words(60)}")
    assert seen["UNAME"] == info["version"]
    assert int(seen["CMDLINE-LEN"]) > len(PAD), seen  # nothing cut at 2048
    assert seen["ENV-COUNT"] == "60", seen  # past Debian's 31: INIT_ENV_ARG_LIMIT is patched
    assert seen["IKCONFIG"] == "1"
    assert seen["MODULE"] == "loaded", seen


@pytest.mark.kernel_compile
@needs_tools
def test_compiled_kernel_boots_the_image_to_selftest_pass(make_lab_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The kernel we ship runs the real image: runc's pivot_root, overlayfs, the CNI bridge,
    and the option checker reading /proc/config.gz inside the booted system."""
    cfg = make_lab_cfg("debian-source", tmp_path / "out")
    entry = pipeline.build_kernel(cfg)
    initramfs = image.build(cfg, Runner(), entry, pipeline.build_tools(cfg)) / image.OUTPUT
    machine = Machine(Arch.AMD64, kernel=entry / "vmlinuz", initrd=initramfs, append="captainos.zram=on",
                      accel=Accel.TCG)
    with Guest(machine, workdir=tmp_path / "qemu") as guest:
        verdict = guest.wait_for(r"CAPTAINOS-SELFTEST: (PASS|FAIL.*)", timeout=900).group(1)
        info = dict(re.findall(r"CAPTAINOS-SELFTEST: info ([^:]+): (.*?)\r?$", guest.serial(), re.M))
        assert verdict == "PASS", guest.tail()
        assert "ok" in info["runc container (pivot_root)"]
        assert "/proc/config.gz" in info["kernel config"], info["kernel config"]
        assert info["swap"].startswith("/dev/zram0 partition"), info["swap"]  # zram built in
        assert guest.wait_exit(120) == 0


@pytest.mark.kernel_compile
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="needs qemu-system-arm")
def test_cross_compile_from_debian_source_arm64(tmp_path: Path) -> None:
    cfg = _cfg("debian-source", Arch.ARM64)
    entry = kernel.build(cfg, Runner())
    info = json.loads((entry / "kernel.json").read_text())
    assert info["arch"] == "arm64" and info["version"].endswith("-captainos")
    assert (entry / "vmlinuz").read_bytes()[0x38:0x3C] == b"ARM\x64"  # arm64 Image header magic
    seen = boot(entry, tmp_path, append=PAD, arch=Arch.ARM64, busybox=_arm64_busybox(cfg, tmp_path))
    assert seen["UNAME"] == info["version"]
    assert int(seen["CMDLINE-LEN"]) > len(PAD), seen
    assert seen["IKCONFIG"] == "1"
    assert seen["MODULE"] == "loaded", seen


def _arm64_busybox(cfg: Config, tmp_path: Path) -> Path:
    """busybox for arm64 from the Debian archive, verified like every other package."""
    deb = debian.package("busybox-static", "arm64", cache_dir=cfg.cache_dir)
    debian.extract(Runner(), deb, tmp_path / "bb")
    return tmp_path / "bb" / "usr" / "bin" / "busybox"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="needs qemu-system-arm")
def test_debian_image_arm64(tmp_path: Path) -> None:
    cfg = _cfg("debian-image", Arch.ARM64)
    entry = kernel.build(cfg, Runner())
    info = json.loads((entry / "kernel.json").read_text())
    assert info["version"].endswith("-arm64")
    seen = boot(entry, tmp_path, arch=Arch.ARM64, busybox=_arm64_busybox(cfg, tmp_path))
    assert seen["UNAME"] == info["version"]
    assert seen["MODULE"] == "loaded", seen
