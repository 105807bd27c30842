import subprocess

import pytest

from captainos import host
from captainos.core import cache, config, pins
from captainos.core.errors import CaptainError
from captainos.sources import mkosi
from captainos.stages import pipeline


def _names(found):
    return {n.command for n in found}


def _load(env):
    """The configuration with the stage table's options (modes) read, as the CLI reads it."""
    return config.load(env=env, stages=pipeline.options())


def test_needs_follow_stage_modes_and_sources():
    cfg = config.load(env={"KERNEL_SOURCE": "debian-image", "TOOLS_SOURCE": "go"})
    found = _names(host.needs(cfg, "build"))
    assert {"dpkg-deb", "gpgv", "go", "xorriso", "zstd"} <= found and "flex" not in found
    compiled = _names(host.needs(config.load(env={"KERNEL_SOURCE": "debian-source"}), "kernel"))
    assert {"make", "flex", "bison", "bc"} <= compiled
    skipped = _names(host.needs(_load({"ISO_MODE": "skip", "KERNEL_MODE": "docker"}), "build"))
    assert "xorriso" not in skipped and "docker" in skipped
    assert _names(host.needs(config.load(env={"ARCH": "arm64"}), "qemu-test")) == {"qemu-system-aarch64"}


def test_cross_compiler_needed_for_foreign_arch():
    cfg = config.load(env={"ARCH": "arm64", "KERNEL_SOURCE": "debian-source"})
    assert "aarch64-linux-gnu-gcc" in _names(host.needs(cfg, "kernel"))


def test_non_root_native_initramfs_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(CaptainError, match="must run as root"):
        host.check(config.load(env={}), "initramfs")


def _fake_deb(tmp_path):
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: mkosi\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    (tree / "usr/lib/python3/dist-packages/mkosi").mkdir(parents=True)
    (tree / "usr/lib/python3/dist-packages/mkosi/__init__.py").write_text("")
    deb = tmp_path / "mkosi_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", tree, deb], check=True, capture_output=True)
    return deb


def test_install_mkosi_verifies_then_unpacks(tmp_path, http_root):
    root, url = http_root
    deb = _fake_deb(tmp_path)
    (root / deb.name).write_bytes(deb.read_bytes())
    pin = pins.DebPin("mkosi", "1", deb.name, cache.sha256_file(deb))
    target = tmp_path / "tools" / "mkosi-1"
    mkosi.install(pin, target, mirror=url)
    assert (target / "usr/lib/python3/dist-packages/mkosi/__init__.py").is_file()


def test_install_mkosi_refuses_a_tampered_package(tmp_path, http_root):
    root, url = http_root
    deb = _fake_deb(tmp_path)
    (root / deb.name).write_bytes(deb.read_bytes() + b"tampered")
    pin = pins.DebPin("mkosi", "1", deb.name, cache.sha256_file(deb))
    target = tmp_path / "tools" / "mkosi-1"
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        mkosi.install(pin, target, mirror=url)
    assert not target.exists()
    assert list((tmp_path / "tools").iterdir()) == []


def test_mkosi_pin_is_well_formed():
    assert len(pins.MKOSI.sha256) == 64 and pins.MKOSI.filename.endswith(f"mkosi_{pins.MKOSI.version}_all.deb")


def test_secure_boot_with_a_kernel_debian_did_not_sign_is_refused_up_front():
    cfg = config.load(env={"SECURE_BOOT": "1", "KERNEL_SOURCE": "debian-source"})
    with pytest.raises(CaptainError, match="--secure-boot needs Debian's signed kernel") as err:
        host.check(cfg, "iso")
    assert "--kernel-source debian-image" in (err.value.hint or "")
    host.check(config.load(env={"SECURE_BOOT": "1", "KERNEL_SOURCE": "debian-source"}), "summary")  # no ISO: fine


@pytest.mark.parametrize("everything", [False, True])
def test_clean_removes_outputs_and_with_all_the_caches(tmp_path, monkeypatch, everything):
    repo = tmp_path / "repo"
    monkeypatch.setattr(host, "REPO", repo)
    monkeypatch.setattr(host, "TOOLS_DIR", repo / ".tools")
    cfg = config.load(env={"OUT_DIR": str(tmp_path / "out"), "CAPTAINOS_CACHE": str(tmp_path / "cache")})
    for made in (cfg.out_dir, repo / "build" / "amd64", cfg.cache_dir / "kernel", repo / ".tools" / "mkosi",
                 repo / "image"):
        made.mkdir(parents=True)
        (made / "f").write_text("x")
    host.clean(cfg, everything)
    assert not cfg.out_dir.exists() and not (repo / "build").exists()
    assert (repo / "image" / "f").is_file()  # sources are never touched
    assert cfg.cache_dir.exists() is not everything and (repo / ".tools").exists() is not everything


def test_a_secure_boot_iso_needs_the_archive_tools_on_the_host_in_any_mode():
    docker = {"KERNEL_MODE": "docker", "TOOLS_MODE": "docker", "INITRAMFS_MODE": "docker", "ISO_MODE": "docker"}
    assert {n.command for n in host.needs(_load(docker), "iso")} == {"docker"}
    signed = _load({**docker, "SECURE_BOOT": "1", "KERNEL_SOURCE": "debian-image"})
    assert {n.command for n in host.needs(signed, "iso")} == {"docker", "gpgv", "dpkg"}
    native = config.load(env={"SECURE_BOOT": "1", "KERNEL_SOURCE": "debian-image"})
    assert {"gpgv", "dpkg", "xorriso"} <= {n.command for n in host.needs(native, "build")}


def test_setup_installs_every_package_a_need_names():
    from captainos.core import needs

    def flat(value):
        return value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)

    named = {need.package for value in vars(needs).values() for need in flat(value) if isinstance(need, needs.Need)}
    named |= {needs.c_compiler(arch).package for arch in config.Arch}
    assert named - set(host.APT_PACKAGES) == {"docker.io", "golang-go"}  # the exceptions APT_PACKAGES names
