"""The arm64 image: mkosi builds it through qemu-user (binfmt_misc), qemu-system-aarch64
boots it (TCG, -machine virt) to the self-test's verdict, directly and as the arm64 ISO under
AAVMF (the UEFI firmware of Debian's qemu-efi-aarch64). Slow: outside the default CI run."""

from __future__ import annotations

from pathlib import Path

import pytest

from captainos.core.config import Accel, Arch, Config
from captainos.core.run import Runner
from captainos.lab import qemu
from captainos.stages import iso

pytestmark = [pytest.mark.integration, pytest.mark.slow]
AAVMF = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
VERDICT = r"CAPTAINOS-SELFTEST: (PASS|FAIL.*)"


def test_arm64_image_boots_to_selftest_pass(arm64: tuple[Config, Path, Path], tmp_path: Path) -> None:
    _, kernel, initramfs = arm64
    machine = qemu.Machine(Arch.ARM64, kernel=kernel / "vmlinuz", initrd=initramfs, accel=Accel.TCG)
    with qemu.Guest(machine, workdir=tmp_path / "qemu") as guest:
        verdict = guest.wait_for(VERDICT, timeout=2400).group(1)
        assert verdict == "PASS", guest.tail()
        assert guest.wait_exit(300) == 0


@pytest.mark.skipif(not AAVMF.is_file(), reason="needs qemu-efi-aarch64")
def test_arm64_iso_boots_under_aavmf_to_selftest_pass(arm64: tuple[Config, Path, Path], tmp_path: Path) -> None:
    """GRUB (arm64-efi) from the ISO as a CD-ROM, no -kernel: the firmware's boot path."""
    cfg, kernel, initramfs = arm64
    image = iso.build(cfg, Runner(), kernel / "vmlinuz", initramfs) / "captainos.iso"
    machine = qemu.Machine(Arch.ARM64, firmware=AAVMF, cdrom=image, accel=Accel.TCG)
    with qemu.Guest(machine, workdir=tmp_path / "qemu") as guest:
        guest.wait_for(r"console=ttyAMA0,115200", timeout=600)  # the kernel started from GRUB's entry
        verdict = guest.wait_for(VERDICT, timeout=2400).group(1)
        assert verdict == "PASS", guest.tail()
