import itertools
from pathlib import Path

import pytest

from captainos.core.config import Accel, Arch
from captainos.lab import qemu


def _pairs(argv):
    return list(itertools.pairwise(argv))


def test_amd64_direct_kernel_boot():
    argv = qemu.argv(qemu.Machine(Arch.AMD64, kernel=Path("/k"), initrd=Path("/i"), append="QEMU=1",
                                  mem="512M", smp=3))
    assert argv[0] == "qemu-system-x86_64"
    pairs = _pairs(argv)
    assert ("-machine", "q35") in pairs and ("-accel", "tcg,thread=single") in pairs
    assert ("-m", "512M") in pairs and ("-smp", "3") in pairs
    assert ("-kernel", "/k") in pairs and ("-initrd", "/i") in pairs
    assert ("-append", "console=ttyS0 audit=0 QEMU=1") in pairs
    assert any(a.startswith("virtio-net-pci,netdev=net0") for a in argv)
    assert "-nographic" in argv


def test_arm64_uses_virt_and_its_console():
    argv = qemu.argv(qemu.Machine(Arch.ARM64, kernel=Path("/k"), accel=Accel.TCG))
    pairs = _pairs(argv)
    assert argv[0] == "qemu-system-aarch64"
    assert ("-machine", "virt") in pairs and ("-cpu", "max") in pairs
    assert ("-append", "console=ttyAMA0 audit=0") in pairs


def test_kvm_uses_host_cpu():
    assert ("-cpu", "host") in _pairs(qemu.argv(qemu.Machine(Arch.AMD64, accel=Accel.KVM)))


def test_auto_accel_must_be_resolved_first():
    with pytest.raises(ValueError):
        qemu.argv(qemu.Machine(Arch.AMD64, accel=Accel.AUTO))


def test_firmware_boot_has_no_kernel_and_a_cdrom():
    argv = qemu.argv(qemu.Machine(Arch.AMD64, firmware=Path("/ovmf.fd"), cdrom=Path("/c.iso")))
    assert "-kernel" not in argv
    assert ("-bios", "/ovmf.fd") in _pairs(argv)
    assert any("file=/c.iso,media=cdrom" in a for a in argv)


def test_disks_serial_log_and_monitor():
    argv = qemu.argv(qemu.Machine(Arch.AMD64, disks=(Path("/d0.img"), Path("/d1.img")),
                                  serial_log=Path("/s.log"), monitor=Path("/m.sock")))
    pairs = _pairs(argv)
    assert ("-serial", "file:/s.log") in pairs
    assert ("-monitor", "unix:/m.sock,server=on,wait=off") in pairs
    assert sum("virtio-blk-pci" in a for a in argv) == 2


def test_a_serial_socket_takes_input_and_still_logs_to_the_file():
    argv = qemu.argv(qemu.Machine(Arch.AMD64, serial_log=Path("/s.log"), serial_socket=Path("/s.sock"),
                                  serial2_log=Path("/s2.log")))
    pairs = _pairs(argv)
    assert ("-chardev", "socket,id=serial0,path=/s.sock,server=on,wait=off,logfile=/s.log") in pairs
    serials = [b for a, b in pairs if a == "-serial"]
    assert serials == ["chardev:serial0", "file:/s2.log"]  # ttyS0, then ttyS1


def test_typing_needs_a_serial_socket(tmp_path):
    guest = qemu.Guest(qemu.Machine(Arch.AMD64, kernel=Path("/k")), workdir=tmp_path)
    with pytest.raises(ValueError, match="serial_socket"):
        guest.type("\r")


def test_monitor_without_serial_log_is_refused():
    with pytest.raises(ValueError):
        qemu.argv(qemu.Machine(Arch.AMD64, monitor=Path("/m.sock")))


def test_probe_falls_back_to_tcg_for_foreign_arch():
    foreign = Arch.ARM64 if Arch.AMD64.is_host() else Arch.AMD64
    assert qemu.probe_accel(foreign) is Accel.TCG


def test_secure_boot_firmware_uses_smm_and_pflash():
    argv = qemu.argv(qemu.Machine(Arch.AMD64, firmware=Path("/code.fd"), firmware_vars=Path("/vars.fd"),
                                  secure_boot=True))
    pairs = _pairs(argv)
    assert ("-machine", "q35,smm=on") in pairs
    assert ("-global", "driver=cfi.pflash01,property=secure,value=on") in pairs
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/code.fd" in argv
    assert "if=pflash,format=raw,unit=1,file=/vars.fd" in argv and "-bios" not in argv
