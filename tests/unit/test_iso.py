import shutil
import subprocess
from pathlib import Path

import pytest

from captainos.core import pins
from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.stages import iso


def test_menu_has_consoles_cmdline_and_the_magic_last():
    menu = iso.grub_cfg(Arch.AMD64, "ipam=de-ad-be-ef-fe-ed::10.0.0.2:24::::: foo=bar")
    line = next(x for x in menu.splitlines() if x.strip().startswith("linux "))
    assert line.split()[:4] == ["linux", "/boot/vmlinuz", "console=tty0", "console=ttyS0,115200"]
    assert "foo=bar" in line and line.endswith(pins.ISO_MAGIC)
    assert menu.count(pins.ISO_MAGIC) == 1
    assert "set timeout=3" in menu and "serial --unit=0 --speed=115200" in menu


def test_arm64_menu_uses_the_pl011_console():
    menu = iso.grub_cfg(Arch.ARM64, "")
    assert "console=ttyAMA0,115200" in menu and "serial --unit" not in menu


@pytest.mark.parametrize("bad", ['a"b', "x\ny", "$(reboot)", "a;b", "{x}", "a|b", "a&b", "a<b", "a>b",
                                 "x=1 #rest", "#x"])
def test_menu_refuses_characters_grub_would_interpret(bad):
    with pytest.raises(CaptainError, match="unsupported character"):
        iso.grub_cfg(Arch.AMD64, bad)


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="grub-script-check (grub-common) not installed")
def test_every_accepted_character_gives_a_menu_grub_parses_with_the_magic_last(tmp_path):
    """Every printable character the check lets through, inside a word and opening one, makes
    a config grub-script-check accepts, whose linux line still ends in Smee's placeholder."""
    accepted = []
    for c in map(chr, range(33, 127)):
        cmdline = f"a=1 b{c}c {c}w x=2"
        try:
            menu = iso.grub_cfg(Arch.AMD64, cmdline)
        except CaptainError:
            continue
        accepted.append(c)
        (tmp_path / "grub.cfg").write_text(menu)
        check = subprocess.run(["grub-script-check", str(tmp_path / "grub.cfg")], capture_output=True, text=True)
        assert check.returncode == 0, (c, check.stdout, check.stderr)
        line = next(x for x in menu.splitlines() if x.strip().startswith("linux "))
        assert line.split()[-1] == pins.ISO_MAGIC
    assert len(accepted) >= 70, accepted
    assert "#" not in accepted and iso.grub_cfg(Arch.AMD64, "a=b#c")  # inside a word "#" is no comment


def test_magic_is_smees_1024_character_string():
    import hashlib

    assert len(pins.ISO_MAGIC) == 1024 and pins.ISO_MAGIC.isalnum()
    assert hashlib.sha256(pins.ISO_MAGIC.encode()).hexdigest() == pins.ISO_MAGIC_SHA256


def test_grub_mkimage_argv_per_arch():
    argv = iso.grub_mkimage_argv(Arch.ARM64, Path("/m"), Path("/o.efi"), Path("/e.cfg"))
    assert argv[:3] == ["grub-mkimage", "--format", "arm64-efi"]
    assert "--config" in argv and "/e.cfg" in argv and "serial" not in argv
    assert "serial" in iso.grub_mkimage_argv(Arch.AMD64, Path("/m"), Path("/o"), Path("/e"))


def test_xorriso_argv_makes_a_hybrid_efi_iso():
    argv = iso.xorriso_argv(Path("/root"), Path("/esp.img"), Path("/out.iso"))
    assert argv[:3] == ["xorriso", "-as", "mkisofs"]
    assert "-append_partition" in argv and "0xef" in argv and "-appended_part_as_gpt" in argv
    assert argv[-3:] == ["-o", "/out.iso", "/root"]
    assert any(a.startswith("--modification-date=") for a in argv)


def test_patch_replaces_in_place_with_the_same_size(smee_patch, tmp_path):
    original = tmp_path / "a.iso"
    original.write_bytes(b"head " + pins.ISO_MAGIC.encode() + b" tail")
    patched = tmp_path / "b.iso"
    smee_patch(original, "ipam=x worker_id=y", patched)
    data = patched.read_bytes()
    assert len(data) == original.stat().st_size
    assert data.startswith(b"head ipam=x worker_id=y ") and data.endswith(b" tail")
    assert pins.ISO_MAGIC.encode() not in data


def test_patch_refuses_too_long_params_and_missing_magic(smee_patch, tmp_path):
    original = tmp_path / "a.iso"
    original.write_bytes(pins.ISO_MAGIC.encode())
    with pytest.raises(CaptainError, match="placeholder holds 1024"):
        smee_patch(original, "x" * 1025, tmp_path / "b.iso")
    (tmp_path / "c.iso").write_bytes(b"nothing here")
    with pytest.raises(CaptainError, match="no command-line placeholder"):
        smee_patch(tmp_path / "c.iso", "x", tmp_path / "d.iso")
    assert not (tmp_path / "b.iso").exists() and not (tmp_path / "d.iso").exists()


def test_check_magic_counts_exactly_one(tmp_path):
    twice = tmp_path / "twice.iso"
    twice.write_bytes(pins.ISO_MAGIC.encode() * 2)
    with pytest.raises(CaptainError, match="2 times"):
        iso.check_magic(twice)
