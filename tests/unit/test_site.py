"""site.py: image reference normalization, the embed list and authorized_keys checks, the
layout naming and archive, and the site segment appended to a built image."""

from __future__ import annotations

import base64
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import cpio, segments, site

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(("ref", "full"), [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.20", "docker.io/library/alpine:3.20"),
    ("tinkerbell/actions:v1", "docker.io/tinkerbell/actions:v1"),
    ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
    ("docker.io/alpine", "docker.io/library/alpine:latest"),
    ("quay.io/tinkerbell/actions/image2disk:v1.0.0", "quay.io/tinkerbell/actions/image2disk:v1.0.0"),
    ("localhost/x", "localhost/x:latest"),
    ("10.0.2.2:5000/a/b", "10.0.2.2:5000/a/b:latest"),
    ("registry:5000/a", "registry:5000/a:latest"),
    (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
    (f"ghcr.io/x/y:1@{DIGEST}", f"ghcr.io/x/y:1@{DIGEST}"),
])
def test_normalize_as_docker_does(ref, full):
    assert site.normalize(ref) == full


@pytest.mark.parametrize("ref", ["", "Alpine", "a b", "a//b", "quay.io/x:", "x:tag with", "x@sha256:12",
                                 "-x", "x:-tag", "https://quay.io/x"])
def test_normalize_refuses_what_is_not_a_reference(ref):
    with pytest.raises(CaptainError, match="not an image reference"):
        site.normalize(ref)


def write(tmp_path: Path, text: str, name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embed_list_sources_targets_and_comments(tmp_path):
    path = write(tmp_path, "# images for site A\n\nquay.io/a/b:1\n  alpine:3   registry.local/alpine:3 # retag\n")
    assert site.parse_embed_list(path) == [site.Embed("quay.io/a/b:1", "quay.io/a/b:1"),
                                          site.Embed("docker.io/library/alpine:3", "registry.local/alpine:3")]


@pytest.mark.parametrize(("text", "message"), [
    ("a b c\n", r"list.txt:1: expected 'SOURCE \[TARGET\]', got 3 words"),
    ("quay.io/x\nBad:ref\n", r"list.txt:2: not an image reference: 'Bad:ref'"),
    ("alpine\ndocker.io/library/alpine:latest\n", r"list.txt:2: docker.io/library/alpine:latest is already "
                                                    r"embedded by line 1"),
    ("# nothing\n\n", "names no image"),
    (f"quay.io/a:1@{DIGEST}\n", r"list.txt:1: quay.io/a:1@sha256:.* has both a tag and a digest"),
])
def test_embed_list_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(CaptainError, match=message):
        site.parse_embed_list(write(tmp_path, text))


def test_embed_list_missing(tmp_path):
    with pytest.raises(CaptainError, match="does not exist"):
        site.parse_embed_list(tmp_path / "nope")


def real_key(tmp_path: Path, kind: str = "ed25519") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "op@site", "-f", str(tmp_path / kind)], check=True)
    return (tmp_path / f"{kind}.pub").read_text().strip()


def test_authorized_keys_accepts_real_keys_with_options(tmp_path):
    ed, ecdsa = real_key(tmp_path), real_key(tmp_path, "ecdsa")
    path = write(tmp_path, f"# operators\n{ed}\nno-port-forwarding,from=\"10.0.0.0/8\" {ecdsa}\n", "keys")
    assert site.parse_authorized_keys(path) == [ed, f'no-port-forwarding,from="10.0.0.0/8" {ecdsa}']


def test_authorized_keys_refuses_a_private_key_and_garbage(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    with pytest.raises(CaptainError, match=r"id:1: not an SSH public key"):
        site.parse_authorized_keys(tmp_path / "id")
    ed = real_key(tmp_path).split()
    with pytest.raises(CaptainError, match=r"keys:2: not an SSH public key"):
        site.parse_authorized_keys(write(tmp_path, f"{' '.join(ed)}\nssh-rsa {ed[1]}\n", "keys"))
    with pytest.raises(CaptainError, match="holds no key"):
        site.parse_authorized_keys(write(tmp_path, "# none\n", "keys"))


def test_ssh_keys_bring_the_ssh_profile(tmp_path):
    assert site.profiles(Config(profiles=("test",))) == ("test",)
    assert site.profiles(Config(profiles=("test",), ssh_authorized_keys=tmp_path / "k")) == ("test", "ssh")
    assert site.profiles(Config(profiles=("ssh",), ssh_authorized_keys=tmp_path / "k")) == ("ssh",)


def test_check_fails_before_any_work(tmp_path):
    with pytest.raises(CaptainError, match="not an SSH public key"):
        site.check(Config(ssh_authorized_keys=write(tmp_path, "hello\n", "keys")))
    site.check(Config())  # nothing asked, nothing checked


def layout(tmp_path: Path, tags: list[str], arch: str = "amd64") -> Path:
    """A layout whose manifests (digests 1..., 2...) each point at a config for arch."""
    root = tmp_path / "layout"
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (blobs / ("c" * 64)).write_text(json.dumps({"architecture": arch, "os": "linux"}))
    manifests = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1,
                  "digest": "sha256:" + f"{n:x}" * 64, "annotations": {site.REF_NAME: tag}}
                 for n, tag in enumerate(tags, 1)]
    for n in range(1, len(tags) + 1):
        (blobs / (f"{n:x}" * 64)).write_text(json.dumps({"config": {"digest": "sha256:" + "c" * 64}}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return root


def test_manifests_get_their_target_names_in_list_order(tmp_path):
    root = layout(tmp_path, ["embed1", "embed0"])  # skopeo appends; a retry may reorder
    embeds = [site.Embed("a:1", "docker.io/library/a:1"), site.Embed("b:1", "quay.io/b:1")]
    named = site.name_manifests(root, embeds, "amd64")
    assert named == [("docker.io/library/a:1", "sha256:" + "2" * 64), ("quay.io/b:1", "sha256:" + "1" * 64)]
    index = json.loads((root / "index.json").read_text())
    assert [m["annotations"] for m in index["manifests"]] == [
        {site.IMAGE_NAME: "docker.io/library/a:1", site.REF_NAME: "docker.io/library/a:1"},
        {site.IMAGE_NAME: "quay.io/b:1", site.REF_NAME: "quay.io/b:1"}]


def test_an_image_for_another_architecture_is_refused(tmp_path):
    root = layout(tmp_path, ["embed0"], arch="amd64")
    with pytest.raises(CaptainError, match=r"the embedded image quay\.io/a:1 is for amd64, not arm64"):
        site.name_manifests(root, [site.Embed("quay.io/a:1", "quay.io/a:1")], "arm64")


def test_layout_tar_is_reproducible_and_fixed(tmp_path):
    root = layout(tmp_path, ["embed0"])
    (root / "blobs" / "sha256" / ("1" * 64)).write_bytes(b"blob")
    first = site.tar_layout(root)
    (root / "index.json").touch()  # a new mtime changes nothing
    assert site.tar_layout(root) == first
    with tarfile.open(fileobj=__import__("io").BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["blobs", "blobs/sha256", f"blobs/sha256/{'1' * 64}",
                                         f"blobs/sha256/{'c' * 64}", "index.json", "oci-layout"]
    assert {(m.uid, m.gid, m.uname) for m in members} == {(0, 0, "")}


def test_copy_pulls_one_platform_into_the_shared_layout(tmp_path):
    argv = site.copy_argv(Config(), "quay.io/a:1", tmp_path / "layout", "embed3")
    assert argv[-2:] == ["docker://quay.io/a:1", f"oci:{tmp_path / 'layout'}:embed3"]
    assert argv[argv.index("--override-arch") + 1] == "amd64" and "--override-os" in argv


def test_site_segment_follows_the_image(tmp_path, monkeypatch):
    """Keys only (no registry needed): the entry is the base image, then one more zstd frame
    whose archive holds the keys; image.json records the segment."""
    base = tmp_path / "base"
    base.mkdir()
    raw = tmp_path / "base.cpio"
    raw.write_bytes(cpio.write([("etc", 0o40755, b"")]))
    Runner().run(["zstd", "-q", "-o", str(base / "initramfs.cpio.zst"), str(raw)])
    (base / "image.json").write_text(json.dumps({"size": 1, "segments": {"os": 1, "tools": 0}}))
    (base / "sbom.spdx.json").write_text('{"spdxVersion": "SPDX-2.3"}\n')
    (base / "packages.lock").write_text("deb bash 5.2.37-2+b5 amd64\n")
    keys = tmp_path / "keys"
    keys.write_text(real_key(tmp_path) + "\n")
    cfg = Config(ssh_authorized_keys=keys, cache_dir=tmp_path / "cache")
    entry = site.build(cfg, Runner(), base)
    data = (entry / "initramfs.cpio.zst").read_bytes()
    frames = segments.frames(data)
    assert len(frames) == 2 and frames[0] == (base / "initramfs.cpio.zst").read_bytes()
    names = {m.name: m for m in cpio.members(cpio.decompress_data(frames[1]))}
    assert names[str(site.SSH_KEYS)].data.decode() == keys.read_text()
    for name in ("sbom.spdx.json", "packages.lock"):
        assert (entry / name).read_bytes() == (base / name).read_bytes()
    info = json.loads((entry / "image.json").read_text())
    assert info["site"] == {"embedded_images": [], "ssh_keys": 1}
    assert info["segments"]["site"] == len(frames[1]) and info["size"] == len(data)
    assert site.build(cfg, Runner(), base) == entry  # cached by its inputs
    keys.write_text(real_key(tmp_path, "ecdsa") + "\n")
    assert site.build(cfg, Runner(), base) != entry


def test_the_key_checker_is_not_fooled_by_a_renamed_blob():
    blob = base64.b64encode(len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + bytes(36)).decode()
    assert site.key_line_ok(f"ssh-ed25519 {blob} c")
    assert not site.key_line_ok(f"ecdsa-sha2-nistp256 {blob} c")
    assert not site.key_line_ok("ssh-ed25519 AAAA")


def test_skip_mode_refuses_site_options(tmp_path):
    from captainos import host
    from captainos.core.config import StageMode

    keys = tmp_path / "keys"
    keys.write_text(real_key(tmp_path) + "\n")
    with pytest.raises(CaptainError, match="need the initramfs stage to run"):
        host.check(Config(ssh_authorized_keys=keys, modes={"initramfs": StageMode.SKIP}), "build")


def test_a_source_with_only_a_digest_is_fine(tmp_path):
    assert site.parse_embed_list(write(tmp_path, f"quay.io/a@{DIGEST} quay.io/a:1\n")) == [
        site.Embed(f"quay.io/a@{DIGEST}", "quay.io/a:1")]


DIGEST = "sha256:" + "f" * 64


@pytest.mark.parametrize(("source", "pinned"), [
    ("quay.io/a/b:1", f"quay.io/a/b@{DIGEST}"), ("10.0.2.2:5000/agent:v1", f"10.0.2.2:5000/agent@{DIGEST}"),
    ("localhost:5000/x", f"localhost:5000/x@{DIGEST}"),
    ("docker.io/library/busybox:1.36", f"docker.io/library/busybox@{DIGEST}"),
    ("quay.io/a@sha256:" + "a" * 64, "quay.io/a@sha256:" + "a" * 64)])
def test_the_copy_names_the_digest_read_for_the_key(source, pinned):
    assert site.by_digest(source, DIGEST) == pinned
