"""The arm64 image: mkosi builds it through qemu-user (binfmt_misc), qemu-system-aarch64
boots it (TCG, -machine virt) to the self-test's verdict. Slow: outside the default CI run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from captainos import pipeline, qemu
from captainos.config import Accel, Arch, Config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def test_arm64_image_boots_to_selftest_pass(lab_cfg: Config, tmp_path: Path) -> None:
    if not Arch.ARM64.is_host() and not BINFMT.exists():
        pytest.fail("qemu-aarch64 is not registered in binfmt_misc: run './build.py setup' as root")
    cfg = dataclasses.replace(lab_cfg, arch=Arch.ARM64, out_dir=tmp_path / "out")
    kernel_entry = pipeline.build_kernel(cfg)
    initramfs_entry = pipeline.build_initramfs(cfg, kernel_entry, pipeline.build_tools(cfg))
    machine = qemu.Machine(Arch.ARM64, kernel=kernel_entry / "vmlinuz",
                           initrd=initramfs_entry / "initramfs.cpio.zst", accel=Accel.TCG)
    with qemu.Guest(machine, workdir=tmp_path / "qemu") as guest:
        verdict = guest.wait_for(r"CAPTAINOS-SELFTEST: (PASS|FAIL.*)", timeout=2400).group(1)
        assert verdict == "PASS", guest.tail()
        assert guest.wait_exit(300) == 0
