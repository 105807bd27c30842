import pytest

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.stages import artifacts


def _make_outputs(out, arch=Arch.AMD64):
    out.mkdir(exist_ok=True)
    (out / artifacts.vmlinuz_name(arch)).write_bytes(b"kernel")
    (out / artifacts.initramfs_name(arch)).write_bytes(b"initramfs")


def test_names_keep_the_original_interface():
    assert artifacts.initramfs_name(Arch.AMD64) == "initramfs-amd64.cpio.zst"
    assert artifacts.vmlinuz_name(Arch.ARM64) == "vmlinuz-arm64"
    assert artifacts.smee_links(Arch.AMD64) == {"vmlinuz-x86_64": "vmlinuz-amd64",
                                                "initramfs-x86_64": "initramfs-amd64.cpio.zst"}
    assert set(artifacts.smee_links(Arch.ARM64)) == {"vmlinuz-aarch64", "initramfs-aarch64"}


def test_smee_links_resolve_to_the_artifacts(tmp_path):
    _make_outputs(tmp_path)
    artifacts.link_smee_names(tmp_path, Arch.AMD64)
    assert (tmp_path / "initramfs-x86_64").read_bytes() == b"initramfs"
    assert (tmp_path / "vmlinuz-x86_64").is_symlink()


def test_checksums_are_sha256sum_compatible(tmp_path):
    import subprocess

    _make_outputs(tmp_path)
    path = artifacts.write_checksums(tmp_path, Arch.AMD64)
    assert subprocess.run(["sha256sum", "--check", "--quiet", path.name], cwd=tmp_path, check=False).returncode == 0
    assert artifacts.verify_checksums(tmp_path, Arch.AMD64) == ["vmlinuz-amd64", "initramfs-amd64.cpio.zst"]


def test_verify_catches_a_changed_file(tmp_path):
    _make_outputs(tmp_path)
    artifacts.write_checksums(tmp_path, Arch.AMD64)
    (tmp_path / "vmlinuz-amd64").write_bytes(b"tampered")
    with pytest.raises(CaptainError, match="checksum mismatch for vmlinuz-amd64"):
        artifacts.verify_checksums(tmp_path, Arch.AMD64)


def test_verify_without_sums_file_says_how_to_make_it(tmp_path):
    with pytest.raises(CaptainError) as err:
        artifacts.verify_checksums(tmp_path, Arch.AMD64)
    assert "checksums" in (err.value.hint or "")


def test_write_without_artifacts_fails_and_writes_nothing(tmp_path):
    with pytest.raises(CaptainError, match="no artifacts for arm64"):
        artifacts.write_checksums(tmp_path, Arch.ARM64)
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_a_sums_file_that_is_not_text(tmp_path):
    _make_outputs(tmp_path)
    path = artifacts.write_checksums(tmp_path, Arch.AMD64)
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    with pytest.raises(CaptainError, match="not a sha256sum file"):
        artifacts.verify_checksums(tmp_path, Arch.AMD64)
