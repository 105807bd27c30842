"""The hardware matrix in QEMU: the test image booted once with every NIC model and every
storage controller this QEMU emulates for the architecture (but mptsas1068, see DISKS; arm64
in the slow marker). Each NIC must get a DHCP address from its own user-mode network, each
disk must appear with its size behind the expected driver and take a write (test profile's
hwreport prints what it found). The kernel's firmware loader runs with its debug messages
on, so the e100 microcode's load from the image is seen; lspci -nnk must name each driver."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

from captainos.core.config import Accel, Arch, Config
from captainos.lab import qemu

pytestmark = pytest.mark.integration

# QEMU device -> the Linux driver that must drive it (docs/hardware.md).
# i82551 (revision 0x0f) is a part for which e100 loads the microcode e100/d102e_ucode.bin
# when the interface comes up: the proof that a firmware file of the image (as .xz) loads.
NICS = {
    Arch.AMD64: {"e1000": "e1000", "e1000e": "e1000e", "rtl8139": "8139cp", "vmxnet3": "vmxnet3",
                 "pcnet": "pcnet32", "igb": "igb", "i82551": "e100"},
    # 8139cp and pcnet32 are amd64 only (kernel/debian-modules.txt).
    Arch.ARM64: {"e1000": "e1000", "e1000e": "e1000e", "vmxnet3": "vmxnet3", "igb": "igb", "i82551": "e100"},
}
E100_FIRMWARE = "e100/d102e_ucode.bin"
# Controller -> (QEMU devices, the driver, disk size in MiB: each size names its controller).
PCI_DISKS = {
    "nvme": ("nvme,serial=capnvme", "nvme", 41),
    "megasas": ("megasas,id=c2 scsi-hd,bus=c2.0", "megaraid_sas", 42),
    "megasas-gen2": ("megasas-gen2,id=c3 scsi-hd,bus=c3.0", "megaraid_sas", 43),
    "virtio-scsi": ("virtio-scsi-pci,id=c6 scsi-hd,bus=c6.0", "virtio_scsi", 46),
    "virtio-blk": ("virtio-blk-pci", "virtio_blk", 47),
    "usb-storage": ("qemu-xhci,id=c8 usb-storage,bus=c8.0", "usb-storage", 48),
}
DISKS = {
    # mptsas1068 is left out: Linux 6.12's mptsas brings the controller up ("LSISAS1068 A0")
    # but never reports the disk behind QEMU 7.2's emulation (nothing within 5 minutes, TCG).
    Arch.AMD64: {"ahci": ("ide-hd,bus=ide.0", "ahci", 40),  # q35's own AHCI controller
                 "lsi53c895a": ("lsi53c895a,id=c5 scsi-hd,bus=c5.0", "sym53c8xx", 45), **PCI_DISKS},
    # The virt machine has no AHCI of its own; sym53c8xx is amd64 only.
    Arch.ARM64: {"ahci": ("ich9-ahci,id=c0 ide-hd,bus=c0.0", "ahci", 40), **PCI_DISKS},
}


def qemu_devices(arch: Arch) -> set[str]:
    out = subprocess.run([arch.qemu_binary(), "-device", "help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r'^name "([^"]+)"', out, re.M))


def matrix_args(arch: Arch, tmp_path: Path, available: set[str]
                ) -> tuple[list[str], dict[str, str], dict[str, tuple[str, int]]]:
    """(extra QEMU args, NIC mac -> driver, controller -> (driver, size in bytes)) for the devices
    this QEMU has."""
    args: list[str] = []
    nics: dict[str, str] = {}
    for index, (model, driver) in enumerate(NICS[arch].items(), start=1):
        if model not in available:
            continue
        mac = f"52:54:00:aa:00:{index:02x}"
        args += ["-netdev", f"user,id=hw{index}", "-device", f"{model},netdev=hw{index},mac={mac}"]
        nics[mac] = driver
    disks: dict[str, tuple[str, int]] = {}
    for index, (name, (devices, driver, mib)) in enumerate(DISKS[arch].items()):
        *controllers, disk = devices.split()
        if any(d.split(",")[0] not in available for d in (*controllers, disk)):
            continue
        image = tmp_path / f"{name}.img"
        image.write_bytes(b"")
        subprocess.run(["truncate", "-s", f"{mib}M", str(image)], check=True)
        args += ["-drive", f"file={image},format=raw,if=none,id=hd{index}"]
        for controller in controllers:
            args += ["-device", controller]
        args += ["-device", f"{disk},drive=hd{index}"]
        disks[name] = (driver, mib * 1024 * 1024)
    return args, nics, disks


def boot_matrix(cfg: Config, kernel_entry: Path, initramfs: Path, tmp_path: Path, timeout: float
                ) -> tuple[str, dict[str, str], dict[str, tuple[str, int]]]:
    """Boot with every NIC and controller of the arch's tables; (the report, NICs, disks)."""
    available = qemu_devices(cfg.arch)
    extra, nics, disks = matrix_args(cfg.arch, tmp_path, available)
    assert len(disks) == len(DISKS[cfg.arch]), f"this QEMU lacks {set(DISKS[cfg.arch]) - set(disks)}"
    machine = qemu.Machine(cfg.arch, kernel=kernel_entry / "vmlinuz", initrd=initramfs, accel=Accel.TCG,
                           append=f"captainos.selftest=off captainos.test.hardware={len(nics) + 1},{len(disks)} "
                                  f'dyndbg="file drivers/base/firmware_loader/main.c +p"',
                           extra=tuple(extra))
    with qemu.Guest(machine, workdir=tmp_path / "qemu") as guest:
        guest.wait_for(r"HW: done", timeout=timeout)
        text = guest.serial().replace("\r", "")
    return text, nics, disks


def test_every_emulated_nic_and_storage_controller(lab_cfg: Config, kernel_entry: Path, tmp_path: Path) -> None:
    from captainos.core.run import Runner
    from captainos.stages import image, pipeline

    initramfs = image.build(lab_cfg, Runner(), kernel_entry, pipeline.build_tools(lab_cfg)) / image.OUTPUT
    check_matrix(lab_cfg, kernel_entry, *boot_matrix(lab_cfg, kernel_entry, initramfs, tmp_path, 900))


@pytest.mark.slow
def test_every_emulated_nic_and_storage_controller_on_arm64(arm64: tuple[Config, Path, Path], tmp_path: Path) -> None:
    """The same on qemu-system-aarch64's virt machine (TCG, several times slower)."""
    cfg, kernel_entry, initramfs = arm64
    check_matrix(cfg, kernel_entry, *boot_matrix(cfg, kernel_entry, initramfs, tmp_path, 2400))


def check_matrix(cfg: Config, kernel_entry: Path, text: str, nics: dict[str, str],
                 disks: dict[str, tuple[str, int]]) -> None:
    from captainos.core.run import Runner
    from captainos.stages import firmware

    seen_nics = {m.group(1): m for m in re.finditer(r"HW: nic (\S+) drivers=(\S*) addr=(\S*)$", text, re.M)}
    seen_disks = [m.groups() for m in re.finditer(r"HW: disk (\S+) size=(\d+) drivers=(\S*) write=(\S+)$", text, re.M)]
    report = "\n".join(line for line in text.splitlines() if "HW: " in line)
    # Every NIC (the harness's own virtio NIC too) has a driver and a DHCP address.
    drivers = [m.group(2).split(",")[0] for m in seen_nics.values()]
    for driver in [*nics.values(), "virtio_net"]:
        assert driver in drivers, f"no NIC driven by {driver}:\n{report}"
    for m in seen_nics.values():
        assert re.match(r"10\.0\.2\.\d+/24$", m.group(3)), f"{m.group(1)} got no DHCP address:\n{report}"
    # e100's microcode came from the image's .xz, decompressed to the package file's size.
    # (Debian's kernel also logs "failed to load" for each suffix it tries first: plain, .zst.)
    record = next(f for f in json.loads((firmware.build(cfg, Runner(), kernel_entry) / "firmware.json")
                                        .read_text())["files"] if f["name"] == E100_FIRMWARE)
    source = rf"HW: kernel e100 \S+: Loading firmware from /lib/firmware/{E100_FIRMWARE}\.xz$"
    assert re.search(source, report, re.M), report
    loaded = re.search(rf"HW: kernel firmware_class: fw_set_page_data: fw-{E100_FIRMWARE} .* size=(\d+)$", report, re.M)
    assert loaded and int(loaded.group(1)) == record["bytes"], report
    # lspci -nnk in the image names the driver of each device: the e100 (8086:1209) here.
    lspci = [line.split("HW: lspci ", 1)[1] for line in report.splitlines() if "HW: lspci " in line]
    start = next((i for i, line in enumerate(lspci) if "[8086:1209]" in line), None)
    assert start is not None, report
    details = [line.strip() for line in itertools.takewhile(lambda ln: ln.startswith("\t"), lspci[start + 1:])]
    assert "Kernel driver in use: e100" in details, report
    # Every disk: its controller's driver on its path, its size, a write read back.
    for name, (driver, size) in disks.items():
        found = [d for d in seen_disks if int(d[1]) == size]
        assert len(found) == 1, f"{name}: no disk of {size} bytes:\n{report}"
        _, _, chain, write = found[0]
        assert driver in chain.split(","), f"{name}: drivers {chain}, expected {driver}:\n{report}"
        assert write == "ok", f"{name}: write {write}:\n{report}"
