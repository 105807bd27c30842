"""OCI image layouts written by oci.py: structure, content and byte-for-byte reproducibility."""

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile

import pytest

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.lab import oci


def blob(layout, digest):
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def read_image(layout):
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest_bytes = blob(layout, desc["digest"])
    assert hashlib.sha256(manifest_bytes).hexdigest() == desc["digest"].split(":")[1]
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    layer = blob(layout, manifest["layers"][0]["digest"])
    return index, manifest, config, layer


@pytest.fixture
def fake_binary(tmp_path):
    path = tmp_path / "tink-agent"
    path.write_bytes(b"\x7fELF fake agent")
    return path


def test_agent_image_layout(tmp_path, fake_binary):
    digest = oci.write_layout(oci.agent_image(fake_binary, Arch.AMD64, "v0.25.0"), tmp_path / "agent", "v0.25.0")
    layout = tmp_path / "agent"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index, manifest, config, layer = read_image(layout)
    assert index["manifests"][0]["digest"] == digest
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v0.25.0"}
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST and manifest["layers"][0]["mediaType"] == oci.MEDIA_LAYER_GZIP
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["Entrypoint"] == ["/tink-agent"] and "Cmd" not in config["config"]
    tar_bytes = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "tink-agent" and member.mode == 0o755 and member.isreg()
        assert (member.uid, member.gid, member.mtime) == (0, 0, 0)
        assert tar.extractfile(member).read() == b"\x7fELF fake agent"
    # Every blob is named by its digest.
    for path in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_same_inputs_same_bytes(tmp_path, fake_binary):
    first = oci.write_layout(oci.agent_image(fake_binary, Arch.AMD64, "v1"), tmp_path / "a", "v1")
    os.utime(fake_binary, (1, 1))  # file times must not matter
    second = oci.write_layout(oci.agent_image(fake_binary, Arch.AMD64, "v1"), tmp_path / "b", "v1")
    assert first == second
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_gzip_header_has_no_time_or_name():
    data = oci.gzip_bytes(b"x" * 100)
    assert data[4:8] == b"\0\0\0\0"  # MTIME
    assert not data[3] & 0x08  # FLG.FNAME unset


def test_arm64_config_has_variant(tmp_path, fake_binary):
    oci.write_layout(oci.agent_image(fake_binary, Arch.ARM64, "v1"), tmp_path / "arm", "v1")
    _, _, config, _ = read_image(tmp_path / "arm")
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")


def test_busybox_action_image(tmp_path, fake_binary):
    image = oci.busybox_image(Arch.host(), busybox=fake_binary)
    oci.write_layout(image, tmp_path / "bb", "e2e")
    _, _, config, layer = read_image(tmp_path / "bb")
    assert config["config"]["Cmd"] == ["/bin/sh"] and "Entrypoint" not in config["config"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = list(members)
    assert names == sorted(names)
    assert members["bin"].isdir() and members["bin/busybox"].isreg()
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert {"bin/dd", "bin/printf", "bin/grep", "bin/sleep", "bin/head", "bin/test"} <= set(names)


def test_bad_member_paths_are_refused():
    with pytest.raises(CaptainError, match="bad or duplicate"):
        oci.layer_tar([oci.Member("/abs", 0o644, b"")])
    with pytest.raises(CaptainError, match="bad or duplicate"):
        oci.layer_tar([oci.Member("a", 0o644, b""), oci.Member("a", 0o644, b"")])


def test_copy_argv_never_holds_credentials(tmp_path):
    creds = oci.Credentials("captain", "s3cret-pass")
    argv = oci.copy_argv(tmp_path / "l", "v1", "127.0.0.1:5000/tink-agent:v1", cert_dir=tmp_path / "certs",
                         auth=tmp_path / "auth.json")
    assert argv[:2] == ["skopeo", "copy"]
    assert ["--dest-cert-dir", str(tmp_path / "certs")] == argv[argv.index("--dest-cert-dir"):][:2]
    assert "--dest-tls-verify=true" in argv and "--dest-authfile" in argv
    assert argv[-2:] == [f"oci:{tmp_path / 'l'}:v1", "docker://127.0.0.1:5000/tink-agent:v1"]
    assert not any("s3cret" in a for a in argv)
    assert "s3cret" not in repr(creds)


def test_auth_file_is_private_and_removed():
    creds = oci.Credentials("captain", "s3cret-pass")
    with oci.auth_file("127.0.0.1:5000", creds) as path:
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        auths = json.loads(path.read_text())["auths"]
        import base64
        assert base64.b64decode(auths["127.0.0.1:5000"]["auth"]) == b"captain:s3cret-pass"
    assert not path.exists()
    with oci.auth_file("r", None) as nothing:
        assert nothing is None


def test_layers_below_come_first_and_plain_tar_layers_are_not_compressed(tmp_path):
    image = oci.Image(Arch.AMD64, (oci.Member("real", 0o755, b"x"), oci.Member("tink-agent", 0o755, link="real")),
                      below=((oci.Member("tink-agent", 0o755, b"old"),),), gzip=False)
    oci.write_layout(image, tmp_path / "img", "v1")
    index = json.loads((tmp_path / "img" / "index.json").read_text())
    manifest = json.loads(blob(tmp_path / "img", index["manifests"][0]["digest"]))
    config = json.loads(blob(tmp_path / "img", manifest["config"]["digest"]))
    layers = [blob(tmp_path / "img", d["digest"]) for d in manifest["layers"]]
    assert [d["mediaType"] for d in manifest["layers"]] == [oci.MEDIA_LAYER_TAR] * 2
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    with tarfile.open(fileobj=io.BytesIO(layers[0])) as low, tarfile.open(fileobj=io.BytesIO(layers[1])) as top:
        assert low.extractfile("tink-agent").read() == b"old"
        link = top.getmember("tink-agent")
        assert link.islnk() and link.linkname == "real"
