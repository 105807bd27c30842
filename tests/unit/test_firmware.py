"""firmware.py: the list file, the declarations of built-in drivers, and a whole build from
real .deb files (dpkg-deb) served by a stand-in for the verified archive."""

from __future__ import annotations

import json
import lzma
import subprocess
from pathlib import Path

import pytest

from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import debian
from captainos.stages import firmware

RELEASE = "6.12.0"


def test_list_parses_packages_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "firmware.txt"
    path.write_text("# comment\npackage firmware-a\n\nskip vendor/old-*.fw  the fallback of the new one  # why\n")
    fwlist = firmware.read_list(path)
    assert fwlist.packages == ("firmware-a",)
    assert fwlist.skip_reason("vendor/old-1.fw") == "the fallback of the new one"
    assert fwlist.skip_reason("vendor/new-1.fw") is None


@pytest.mark.parametrize("line", ["skip vendor/x.fw", "package", "package a b", "include other.txt"])
def test_list_refuses_other_lines_with_their_number(tmp_path: Path, line: str) -> None:
    path = tmp_path / "firmware.txt"
    path.write_text(f"package firmware-a\n{line}\n")
    with pytest.raises(CaptainError, match=r"firmware.txt:2: expected"):
        firmware.read_list(path)


def test_the_shipped_list_parses_and_every_skip_has_a_reason() -> None:
    fwlist = firmware.read_list()
    assert fwlist.packages and all(s.reason for s in fwlist.skips)


def test_builtin_modinfo_gives_firmware_per_driver() -> None:
    raw = (b"r8169.license=GPL\0r8169.firmware=rtl_nic/a.fw\0r8169.firmware=rtl_nic/b.fw\0"
           b"ice.firmware=intel/ice/ddp/ice.pkg\0broken\0x.firmware=\0")
    assert firmware.builtin_firmware(raw) == {"r8169": ["rtl_nic/a.fw", "rtl_nic/b.fw"],
                                              "ice": ["intel/ice/ddp/ice.pkg"]}


def make_deb(tmp_path: Path, name: str, files: dict[str, bytes], links: dict[str, str],
             copyright_text: str | None = None) -> Path:
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    if copyright_text is not None:
        (root / "usr/share/doc" / name).mkdir(parents=True)
        (root / "usr/share/doc" / name / "copyright").write_text(copyright_text)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                             f"Maintainer: t <t@example.org>\nDescription: test\n")
    for rel, data in files.items():
        (root / "usr/lib/firmware" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "usr/lib/firmware" / rel).write_bytes(data)
    for rel, target in links.items():
        (root / "usr/lib/firmware" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "usr/lib/firmware" / rel).symlink_to(target)
    deb = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", root, deb], check=True, capture_output=True)
    return deb


class Debs:
    """Stands in for debian.Archive: the .debs are real, the signature chain is tested in test_debian."""

    def __init__(self, debs: dict[str, Path]) -> None:
        self.debs = debs

    def package(self, name: str, arch: str) -> debian.Package:
        if name not in self.debs:
            raise CaptainError(f"package {name} not found")
        return debian.Package(name, "1.0", "all", f"pool/{name}.deb", "0" * 64, 1)

    def fetch(self, pkg: debian.Package) -> Path:
        return self.debs[pkg.name]


def kernel_entry(tmp_path: Path, builtin: dict[str, list[str]]) -> Path:
    entry = tmp_path / "kernel" / "k1"
    mods = entry / "modules/usr/lib/modules" / RELEASE
    mods.mkdir(parents=True)
    (entry / "kernel.json").write_text(json.dumps({"version": RELEASE}))
    records = [f"{mod}.firmware={name}" for mod, names in builtin.items() for name in names]
    (mods / "modules.builtin.modinfo").write_bytes(b"\0".join(r.encode() for r in records) + b"\0")
    return entry


BLOB = bytes(range(256)) * 64
COPYRIGHT = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
             "Files: *\nLicense: non-free\n")


def test_build_packs_declared_files_as_xz_and_nothing_else(tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "firmware-test", {"vendor/real-1.0.bin": BLOB, "vendor/old.fw": b"old",
                                               "vendor/unused.bin": b"nobody asks"},
                   {"vendor/nic.bin": "real-1.0.bin"}, copyright_text=COPYRIGHT)
    fwlist = tmp_path / "firmware.txt"
    fwlist.write_text("package firmware-test\nskip vendor/old.fw  fallback of the new one\n")
    entry = kernel_entry(tmp_path, {"nicdrv": ["vendor/nic.bin", "vendor/old.fw"], "other": ["vendor/nic.bin"]})
    cfg = Config(cache_dir=tmp_path / "cache")
    out = firmware.build(cfg, Runner(), entry, Debs({"firmware-test": deb}), fwlist)
    files = sorted(str(p.relative_to(out / "tree")) for p in (out / "tree").rglob("*") if p.is_file())
    assert files == ["usr/lib/firmware/vendor/nic.bin.xz", "usr/share/captainos/firmware-copyright/firmware-test",
                     "usr/share/captainos/firmware.json"]
    # The package's copyright file, for the SBOM's licenses (mkosi.postinst.chroot reads it).
    assert (out / "tree" / firmware.COPYRIGHTS / "firmware-test").read_text() == COPYRIGHT
    packed = out / "tree/usr/lib/firmware/vendor/nic.bin.xz"
    assert not packed.is_symlink() and lzma.decompress(packed.read_bytes()) == BLOB
    assert packed.read_bytes()[6:8] == b"\x00\x01"  # stream flags: CRC32, what the kernel's loader checks
    subprocess.run(["xz", "-t", packed], check=True)  # the reference tool agrees
    report = json.loads((out / "firmware.json").read_text())
    assert report["files"] == [{"name": "vendor/nic.bin", "drivers": ["nicdrv", "other"],
                                "package": "firmware-test", "bytes": len(BLOB), "xz_bytes": packed.stat().st_size}]
    assert report["skipped"] == [{"name": "vendor/old.fw", "reason": "fallback of the new one", "drivers": ["nicdrv"]}]
    assert (out / "tree" / firmware.REPORT).read_text() == (out / "firmware.json").read_text()
    # Same inputs: the cached entry; its bytes are the same when built again.
    assert firmware.build(cfg, Runner(), entry, Debs({"firmware-test": deb}), fwlist) == out
    again = firmware.build(Config(cache_dir=tmp_path / "cache2"), Runner(), entry,
                           Debs({"firmware-test": deb}), fwlist)
    assert (again / "tree/usr/lib/firmware/vendor/nic.bin.xz").read_bytes() == packed.read_bytes()


def test_missing_firmware_fails_the_build_and_names_file_and_driver(tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "firmware-test", {"vendor/a.bin": b"a"},
                   {"vendor/escape.bin": "/etc/passwd", "vendor/loop.bin": "loop.bin"})
    fwlist = tmp_path / "firmware.txt"
    fwlist.write_text("package firmware-test\n")
    # A link out of the package (to the build host's files) or a loop counts as missing.
    entry = kernel_entry(tmp_path, {"drv": ["vendor/a.bin", "vendor/gone.bin", "vendor/escape.bin",
                                            "vendor/loop.bin"]})
    cache_dir = tmp_path / "cache"
    with pytest.raises(CaptainError) as err:
        firmware.build(Config(cache_dir=cache_dir), Runner(), entry, Debs({"firmware-test": deb}), fwlist)
    assert "3 firmware file(s)" in err.value.message
    for name in ("vendor/gone.bin (drv)", "vendor/escape.bin (drv)", "vendor/loop.bin (drv)"):
        assert name in err.value.message
    assert "skip" in (err.value.hint or "")
    assert not list((cache_dir / "firmware" / "amd64").glob("*/firmware.json"))


def test_a_kernel_declaring_nothing_needs_no_package(tmp_path: Path) -> None:
    entry = kernel_entry(tmp_path, {})
    fwlist = tmp_path / "firmware.txt"
    fwlist.write_text("package firmware-not-fetched\n")
    out = firmware.build(Config(cache_dir=tmp_path / "cache"), Runner(), entry, Debs({}), fwlist)
    assert json.loads((out / "firmware.json").read_text())["files"] == []
