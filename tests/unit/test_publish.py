"""Versioned names in out/ and the release image of out/ (publish): names, layers, digests, refusals.
The push, pull and mount with the real registry and containerd: tests/integration/test_publish.py."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.stages import artifacts, oci, publish

RELEASE = "6.12.117+deb13-amd64"


def make_out(out: Path, arch: Arch = Arch.AMD64, release: str = RELEASE, iso: bool = False) -> Path:
    """out/ as the pipeline leaves it: the artifacts, Smee's and the versioned names, the sums."""
    out.mkdir(exist_ok=True)
    names = [artifacts.vmlinuz_name(arch), artifacts.initramfs_name(arch)] + ([artifacts.iso_name(arch)] if iso else [])
    for name in names:
        (out / name).write_bytes(f"{name} of {release}".encode())
        artifacts.link_versioned(out, arch, name, release)
    artifacts.link_smee_names(out, arch)
    artifacts.write_checksums(out, arch)
    return out


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def manifests(layout: Path) -> list[dict]:
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    doc = json.loads(blob(layout, top["digest"]))
    if doc["mediaType"] == oci.MEDIA_INDEX:
        return [json.loads(blob(layout, m["digest"])) | {"platform": m["platform"]} for m in doc["manifests"]]
    return [doc]


def image_files(layout: Path, manifest: dict) -> dict[str, bytes]:
    """name -> content of every file the image's layers hold (hard links resolved)."""
    found: dict[str, bytes] = {}
    for layer in manifest["layers"]:
        assert layer["mediaType"] == oci.MEDIA_LAYER_TAR
        with tarfile.open(fileobj=io.BytesIO(blob(layout, layer["digest"]))) as tar:
            for member in tar.getmembers():
                assert member.mtime == 0 and member.uid == 0 and member.mode == 0o644, member.name
                if member.islnk():
                    found[member.name] = found[member.linkname]
                else:
                    assert member.isfile(), member.name
                    handle = tar.extractfile(member)
                    assert handle is not None
                    found[member.name] = handle.read()
    return found


def test_versioned_names_follow_the_issue():
    assert artifacts.versioned_name("vmlinuz-amd64", Arch.AMD64, RELEASE) == f"vmlinuz-{RELEASE}-x86_64"
    assert artifacts.versioned_name("initramfs-amd64.cpio.zst", Arch.AMD64, RELEASE) == f"initramfs-{RELEASE}-x86_64"
    assert artifacts.versioned_name("captainos-arm64.iso", Arch.ARM64, "6.12.9") == "captainos-6.12.9-aarch64.iso"
    assert artifacts.versioned_name("sha256sums-amd64.txt", Arch.AMD64, "6.12.9") == "sha256sums-6.12.9-x86_64.txt"


def test_a_new_kernel_release_replaces_the_old_versioned_link(tmp_path):
    out = make_out(tmp_path / "out")
    artifacts.link_versioned(out, Arch.AMD64, "vmlinuz-amd64", "6.12.999")
    assert not (out / f"vmlinuz-{RELEASE}-x86_64").exists()
    assert (out / "vmlinuz-6.12.999-x86_64").read_bytes() == (out / "vmlinuz-amd64").read_bytes()
    assert (out / "vmlinuz-x86_64").is_symlink()  # Smee's name is not a versioned name
    # The initramfs still carries the old kernel's name: out/ mixes kernels, said in one line.
    with pytest.raises(CaptainError, match=r"out/ mixes kernels for amd64: initramfs-amd64.cpio.zst from "
                                           r"6\.12\.117\+deb13-amd64, vmlinuz-amd64 from 6\.12\.999"):
        artifacts.write_checksums(out, Arch.AMD64)


def test_the_sums_list_every_name_and_sha256sum_checks_them(tmp_path):
    out = make_out(tmp_path / "out")
    sums = (out / "sha256sums-amd64.txt").read_text()
    names = [line.split("  ")[1] for line in sums.splitlines()]
    assert names == ["vmlinuz-amd64", f"vmlinuz-{RELEASE}-x86_64", "vmlinuz-x86_64", "initramfs-amd64.cpio.zst",
                     f"initramfs-{RELEASE}-x86_64", "initramfs-x86_64"]
    assert (out / f"sha256sums-{RELEASE}-x86_64.txt").read_text() == sums
    assert subprocess.run(["sha256sum", "--check", "--quiet", "sha256sums-amd64.txt"], cwd=out).returncode == 0


def test_the_image_holds_every_name_of_every_file_at_its_root(tmp_path):
    out = make_out(tmp_path / "out", iso=True)
    digest = publish.write(out, tmp_path / "layout", "v1")
    manifest, arm64 = manifests(tmp_path / "layout")  # both platforms even with amd64 files only
    assert manifest["layers"] == arm64["layers"] and arm64["platform"]["architecture"] == "arm64"
    files = image_files(tmp_path / "layout", manifest)
    expected = {p.name for p in out.iterdir()}
    assert set(files) == expected
    for name, data in files.items():
        assert data == (out / name).read_bytes(), name
    # One layer per file of out/ (artifact or sums), holding its names; diff_ids are the layers.
    assert len(manifest["layers"]) == 4
    config = json.loads(blob(tmp_path / "layout", manifest["config"]["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"] for layer in manifest["layers"]]}
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"]["Labels"]["io.captainos.kernel-release.amd64"] == RELEASE
    for layer in manifest["layers"]:  # every blob is what its descriptor says
        assert "sha256:" + hashlib.sha256(blob(tmp_path / "layout", layer["digest"])).hexdigest() == layer["digest"]
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    assert index["manifests"][0]["annotations"] == {oci.REF_NAME: "v1"}


def test_two_publishes_of_the_same_out_give_the_same_digests(tmp_path):
    out = make_out(tmp_path / "out")
    first = publish.write(out, tmp_path / "a", "v1")
    for path in out.iterdir():  # times and inode order must not matter
        path.touch()
    assert publish.write(out, tmp_path / "b", "v1") == first
    assert sorted(p.name for p in (tmp_path / "a/blobs/sha256").iterdir()) == sorted(
        p.name for p in (tmp_path / "b/blobs/sha256").iterdir())


def test_both_arches_make_an_index_whose_platforms_each_hold_everything(tmp_path):
    out = make_out(tmp_path / "out")
    make_out(out, Arch.ARM64, "6.12.117+deb13-arm64")
    publish.write(out, tmp_path / "layout", "v1")
    found = manifests(tmp_path / "layout")
    assert [m["platform"] for m in found] == [{"architecture": "amd64", "os": "linux"},
                                              {"architecture": "arm64", "os": "linux", "variant": "v8"}]
    assert found[0]["layers"] == found[1]["layers"]
    assert set(image_files(tmp_path / "layout", found[1])) == {p.name for p in out.iterdir()}
    assert "vmlinuz-6.12.117+deb13-arm64-aarch64" in image_files(tmp_path / "layout", found[0])


def test_a_changed_file_is_refused_and_the_old_layout_stays(tmp_path):
    out = make_out(tmp_path / "out")
    digest = publish.write(out, tmp_path / "layout", "v1")
    (out / "initramfs-amd64.cpio.zst").write_bytes(b"tampered")
    with pytest.raises(CaptainError, match=r"checksum mismatch for initramfs-amd64.cpio.zst"):
        publish.write(out, tmp_path / "layout", "v1")
    assert json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"] == digest


def test_a_failure_halfway_through_leaves_the_old_layout_and_no_temp_dir(tmp_path, monkeypatch):
    out = make_out(tmp_path / "out")
    digest = publish.write(out, tmp_path / "layout", "v1")
    real, calls = publish._layer, []

    def failing(layout, file):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(layout, file)

    monkeypatch.setattr(publish, "_layer", failing)
    with pytest.raises(OSError, match="No space left"):
        publish.write(out, tmp_path / "layout", "v2")
    assert json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"] == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout", "out"]  # no temp dir left


@pytest.mark.parametrize("where", ["out", ".", "out/oci", "home"])
def test_oci_dir_never_replaces_out_or_a_directory_that_is_not_a_layout(tmp_path, where):
    out = make_out(tmp_path / "out")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(CaptainError, match="--oci-dir"):
        publish.run(Config(out_dir=out), tmp_path / where, None)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
    assert (out / "vmlinuz-amd64").is_file()
    publish.run(Config(out_dir=out), tmp_path / "layout", None)
    publish.run(Config(out_dir=out), tmp_path / "layout", None)  # a layout may be replaced


def test_a_signature_left_in_out_is_not_published_unsigned(tmp_path):
    out = make_out(tmp_path / "out")
    (out / "sha256sums-amd64.txt.sig").write_text("stale")
    publish.write(out, tmp_path / "layout", "v1")
    assert "sha256sums-amd64.txt.sig" not in image_files(tmp_path / "layout", manifests(tmp_path / "layout")[0])


def test_a_name_the_sums_do_not_list_is_refused(tmp_path):
    out = make_out(tmp_path / "out")
    (out / "vmlinuz-extra").symlink_to("vmlinuz-amd64")  # added after the sums were written
    with pytest.raises(CaptainError, match=r"sha256sums-amd64.txt does not list vmlinuz-extra"):
        publish.write(out, tmp_path / "layout", "v1")


def test_nothing_to_publish_is_one_error(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CaptainError, match="nothing to publish"):
        publish.write(tmp_path / "out", tmp_path / "layout", "v1")
    with pytest.raises(CaptainError, match="publish needs somewhere to put the image"):
        publish.run(Config(out_dir=tmp_path / "out"), None, None)
    assert not (tmp_path / "layout").exists()


@pytest.mark.parametrize(("ref", "why"), [
    ("captainos:v1", "invalid image reference"),
    ("library/captainos:v1", "invalid image reference"),
    ("registry.example.com/captainos", "invalid image reference"),
    ("registry.example.com/captainos:v1@sha256:" + "a" * 64, "a digest cannot be pushed to"),
    ("registry.example.com/captainos:-v1", "invalid tag"),
    ("registry.example.com/captainos:v 1", "invalid tag"),
])
def test_a_bad_destination_is_one_error_before_any_work(tmp_path, ref, why):
    out = make_out(tmp_path / "out")
    with pytest.raises(CaptainError, match=why):
        publish.run(Config(out_dir=out), tmp_path / "layout", ref)
    assert not (tmp_path / "layout").exists()


def test_good_destinations_name_their_tag():
    assert oci.check_reference("127.0.0.1:5000/captainos:v0.1.0") == ("127.0.0.1:5000", "v0.1.0")
    assert oci.check_reference("registry.example.com/tinkerbell/captainos:6.12") == ("registry.example.com", "6.12")
    assert oci.check_reference("localhost/captainos:latest") == ("localhost", "latest")


def test_a_bad_signing_key_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    out = make_out(tmp_path / "out")
    cfg = Config(out_dir=out, cache_dir=tmp_path / "cache")
    with pytest.raises(CaptainError, match=r"signing key .* does not exist"):
        publish.run(cfg, tmp_path / "layout", None, tmp_path / "missing.key")
    (tmp_path / "plain.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(CaptainError, match="is not a cosign private key"):
        publish.run(cfg, tmp_path / "layout", None, tmp_path / "plain.key")
    (tmp_path / "cosign.key").write_text("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    with pytest.raises(CaptainError, match="COSIGN_PASSWORD is not set"):
        publish.run(cfg, tmp_path / "layout", None, tmp_path / "cosign.key")
    assert not (tmp_path / "layout").exists() and not (tmp_path / "cache").exists()
    assert not list(out.glob("*.sig"))


def test_new_sums_remove_the_signature_of_the_old_ones(tmp_path):
    out = make_out(tmp_path / "out")
    (out / "sha256sums-amd64.txt.sig").write_text("sig")
    artifacts.link_versioned(out, Arch.AMD64, "sha256sums-amd64.txt.sig", RELEASE)
    artifacts.write_checksums(out, Arch.AMD64)
    assert not list(out.glob("*.sig"))
