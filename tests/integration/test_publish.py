"""`./build.py publish` against the real thing: out/ as the pipeline writes it (the real amd64
kernel and initramfs, with their versioned names), pushed by skopeo to the real registry
(docker-registry 2.8, TLS, one with htpasswd), pulled by the real containerd 2.2.1 of our
tools stage and mounted read-only the way the kubelet mounts an image volume; every file is
read back through the mount and its sha256 compared with out/."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from captainos.core.config import REPO, Arch, Config
from captainos.core.run import Runner
from captainos.lab import registry
from captainos.lab.containerd import chain_id, hosts_toml
from captainos.lab.oci import Credentials, auth_file_json
from captainos.stages import artifacts, oci, pipeline
from tests.integration.test_agent_setup import containerd, tools_bin  # noqa: F401

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("skopeo", "openssl", "docker-registry")),
                       reason="needs skopeo, openssl and docker-registry (./build.py setup)"),
]

CREDS = Credentials("publisher", "publish-pw-9313")
ARM64_RELEASE = "6.12.117+deb13-arm64"


@pytest.fixture(scope="module")
def out(lab_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """out/ from the real pipeline (kernel and initramfs stages, cache hits after the image
    tests), plus a small arm64 set (stand-in files) so that the image is a two-platform index."""
    cfg = dataclasses.replace(lab_cfg, out_dir=tmp_path_factory.mktemp("publish-out"))
    kernel_entry = pipeline.build_kernel(cfg)
    pipeline.build_initramfs(cfg, kernel_entry, pipeline.build_tools(cfg))
    artifacts.write_checksums(cfg.out_dir, Arch.AMD64)
    for name in (artifacts.vmlinuz_name(Arch.ARM64), artifacts.initramfs_name(Arch.ARM64)):
        (cfg.out_dir / name).write_bytes(f"arm64 stand-in: {name}\n".encode())
        artifacts.link_versioned(cfg.out_dir, Arch.ARM64, name, ARM64_RELEASE)
    artifacts.link_smee_names(cfg.out_dir, Arch.ARM64)
    artifacts.write_checksums(cfg.out_dir, Arch.ARM64)
    return cfg.out_dir


@pytest.fixture(scope="module")
def registries(lab_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, registry.Registry]]:
    """An open registry and one with htpasswd, trusted the way an operator's host trusts its
    registry: /etc/containers/certs.d/HOST:PORT/ca.crt (removed afterwards)."""
    work = tmp_path_factory.mktemp("publish-registries")
    ca = registry.ensure_ca(lab_cfg.cache_dir, Runner())
    made = []
    with registry.Registry(ca, work, "open") as open_reg, \
            registry.Registry(ca, work, "auth", creds=CREDS) as auth_reg:
        try:
            for reg in (open_reg, auth_reg):
                path = Path("/etc/containers/certs.d") / reg.host_address
                path.mkdir(parents=True)
                made.append(path)
                shutil.copy(reg.cert_dir / "ca.crt", path / "ca.crt")
            yield {"open": open_reg, "auth": auth_reg}
        finally:
            for path in made:
                shutil.rmtree(path)


def build_py(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point, as an operator runs it."""
    base = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE",)}
    return subprocess.run([sys.executable, str(REPO / "build.py"), "publish", *args],
                          env={**base, "OUT_DIR": str(out), **(env or {})}, capture_output=True, text=True,
                          check=False, timeout=600)


@pytest.fixture(scope="module")
def pushed(out: Path, registries, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Publish once to a layout and the open registry; returns the reference and the digest printed."""
    layout = tmp_path_factory.mktemp("publish-layout") / "layout"
    ref = f"{registries['open'].host_address}/tinkerbell/captainos:v1"
    result = build_py(out, "--oci-dir", str(layout), "--to", ref)
    assert result.returncode == 0, result.stderr
    return {"ref": ref, "digest": result.stdout.strip(), "layout": str(layout)}


def skopeo_raw(ref: str, *extra: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--raw", *extra, f"docker://{ref}"], capture_output=True,
                          check=True, timeout=120).stdout


def test_the_registry_serves_the_digest_publish_printed(pushed):
    raw = skopeo_raw(pushed["ref"])
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed["digest"]
    index = json.loads(raw)
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_skopeo_shows_a_config_whose_diff_ids_are_the_layers(pushed, arch):
    index = json.loads(skopeo_raw(pushed["ref"]))  # --raw gives the index whatever the arch
    (digest,) = [m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == arch]
    manifest = json.loads(skopeo_raw(f"{pushed['ref'].rsplit(':', 1)[0]}@{digest}"))
    config = json.loads(skopeo_raw(pushed["ref"], "--config", "--override-arch", arch))
    assert config["architecture"] == arch and config["os"] == "linux"
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    assert all(layer["mediaType"] == oci.MEDIA_LAYER_TAR for layer in manifest["layers"])


def test_a_second_publish_of_the_same_out_gives_the_same_digest(out, pushed, tmp_path):
    result = build_py(out, "--oci-dir", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pushed["digest"]


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64"])
def test_containerd_pulls_and_mounts_it_with_every_file_intact(out, pushed, registries, containerd, tools_bin,  # noqa: F811
                                                               tmp_path, platform):
    def ctr(*args: str) -> str:
        result = subprocess.run([str(tools_bin / "ctr"), "--address", str(containerd), "--namespace", "k8s.io",
                                 *args], capture_output=True, text=True, check=False, timeout=300)
        assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr}"
        return result.stdout

    host = registries["open"].host_address
    hosts = tmp_path / "certs.d" / host / "hosts.toml"  # containerd's own trust configuration
    hosts.parent.mkdir(parents=True)
    hosts.write_text(hosts_toml(host, registries["open"].cert_dir / "ca.crt"))
    ctr("images", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--platform", platform, pushed["ref"])
    # What the kubelet's image volume gets from containerd's CRI: a read-only view of the
    # image's top snapshot (named by the chain ID of its diff_ids), mounted at the volume's
    # path. (`ctr images mount` would be shorter, but containerd 2.2.1's mount manager hands
    # it a bind mount without options, which the kernel refuses: "no such device".)
    config = json.loads(skopeo_raw(pushed["ref"], "--config", "--override-arch", platform.split("/")[1]))
    chain = chain_id(config["rootfs"]["diff_ids"])
    key = f"captain-{platform.replace('/', '-')}"
    # (ctr's lease ends when it exits and the view goes with it; the layers it names stay,
    # held by the image.)
    (view,) = json.loads(ctr("snapshots", "view", "--mounts", key, chain))
    mount = tmp_path / "captain"
    mount.mkdir()
    subprocess.run(["mount", "-t", view["Type"], "-o", ",".join(view["Options"]), view["Source"], str(mount)],
                   check=True, timeout=60)
    try:
        seen = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mount.iterdir()}
        expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()
                    if p.name in set(artifacts.checksum_names(out, Arch.AMD64) + artifacts.checksum_names(
                        out, Arch.ARM64)) or (p.name.startswith("sha256sums-") and p.name.endswith(".txt"))}
        assert seen == expected
        kernel = artifacts.release_of(out, Arch.AMD64)
        assert f"vmlinuz-{kernel}-x86_64" in seen and f"initramfs-{kernel}-x86_64" in seen
        assert "vmlinuz-x86_64" in seen and "initramfs-aarch64" in seen
        assert all(p.is_file() and not p.is_symlink() for p in mount.iterdir())  # nginx needs no links
        with pytest.raises(OSError, match="Read-only file system"):
            (mount / "vmlinuz-amd64").write_bytes(b"x")
        # The sums in the image check the image's own files.
        check = subprocess.run(["sha256sum", "--check", "--quiet", "sha256sums-amd64.txt", "sha256sums-arm64.txt"],
                               cwd=mount, capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=60)


def test_credentials_come_from_the_auth_file_only(out, registries, cosign, keys, tmp_path, monkeypatch):
    """Without an auth file the htpasswd registry refuses the push; with REGISTRY_AUTH_FILE
    skopeo pushes and cosign signs there too (it reads that file as well), and neither the
    registry password nor the key's ever shows."""
    from captainos.stages import sign

    ref = f"{registries['auth'].host_address}/captainos:v1"
    refused = build_py(out, "--to", ref)
    assert refused.returncode != 0
    assert "authentication required" in refused.stderr or "unauthorized" in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(("error", "hint")), refused.stderr
    auth = tmp_path / "auth.json"
    auth.touch(mode=0o600)
    auth.write_text(auth_file_json(registries["auth"].host_address, CREDS))
    result = build_py(out, "--debug", "--to", ref, "--sign-key", str(keys["site"]),
                      env={"REGISTRY_AUTH_FILE": str(auth), "COSIGN_PASSWORD": KEY_PASSWORD})
    assert result.returncode == 0, result.stderr
    for secret in (CREDS.password, KEY_PASSWORD):
        assert secret not in result.stdout + result.stderr + refused.stderr
    assert json.loads(skopeo_raw(ref, "--authfile", str(auth)))["mediaType"] == oci.MEDIA_INDEX
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    pinned = f"{ref.rsplit(':', 1)[0]}@{result.stdout.strip()}"
    verified = cosign_run(cosign, sign.verify_image_argv(cosign, keys["site.pub"], pinned))
    assert verified.returncode == 0, verified.stderr


KEY_PASSWORD = "key-pw-5521"


@pytest.fixture(scope="module")
def cosign(lab_cfg: Config) -> Path:
    from captainos.stages import sign

    return sign.build(lab_cfg, Runner())


@pytest.fixture(scope="module")
def keys(cosign: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two cosign key pairs: the site's, and another one."""
    from captainos.stages import sign

    made = {}
    for name in ("site", "other"):
        work = tmp_path_factory.mktemp(f"keys-{name}")
        with sign.cosign_env() as env:
            subprocess.run([str(cosign), "generate-key-pair"], cwd=work, env={**env, "PATH": os.environ["PATH"],
                           "COSIGN_PASSWORD": KEY_PASSWORD}, check=True, capture_output=True, timeout=120)
        made[name], made[f"{name}.pub"] = work / "cosign.key", work / "cosign.pub"
    return made


def cosign_run(cosign: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    from captainos.stages import sign

    with sign.cosign_env() as env:
        return subprocess.run(argv, env={**env, "PATH": os.environ["PATH"]}, capture_output=True, text=True,
                              check=False, timeout=300)


def test_a_signed_publish_verifies_with_the_public_key_only(out, registries, cosign, keys, tmp_path):
    from captainos.stages import sign

    ref = f"{registries['open'].host_address}/tinkerbell/captainos-signed:v1"
    result = build_py(out, "--oci-dir", str(tmp_path / "layout"), "--to", ref, "--sign-key", str(keys["site"]),
                      env={"COSIGN_PASSWORD": KEY_PASSWORD})
    assert result.returncode == 0, result.stderr
    assert KEY_PASSWORD not in result.stdout + result.stderr
    pinned = f"{ref.rsplit(':', 1)[0]}@{result.stdout.strip()}"
    good = cosign_run(cosign, sign.verify_image_argv(cosign, keys["site.pub"], pinned))
    assert good.returncode == 0, good.stderr
    assert "The signatures were verified against the specified public key" in good.stdout + good.stderr
    wrong = cosign_run(cosign, sign.verify_image_argv(cosign, keys["other.pub"], pinned))
    assert wrong.returncode != 0
    # The sums: their signature sits beside them in out/ and in the image, and checks out.
    for arch in (Arch.AMD64, Arch.ARM64):
        sums = out / artifacts.checksums_name(arch)
        checked = cosign_run(cosign, sign.verify_blob_argv(cosign, keys["site.pub"], sums))
        assert checked.returncode == 0 and "Verified OK" in checked.stdout + checked.stderr, checked.stderr
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == result.stdout.strip()
    tampered = tmp_path / "sha256sums-amd64.txt"
    tampered.write_text((out / "sha256sums-amd64.txt").read_text().replace("  vmlinuz", "  vmlinux", 1))
    shutil.copy(out / "sha256sums-amd64.txt.sig", tmp_path / "sha256sums-amd64.txt.sig")
    assert cosign_run(cosign, sign.verify_blob_argv(cosign, keys["site.pub"], tampered)).returncode != 0


def test_the_signature_of_the_sums_is_in_the_image_only_when_signed(out, tmp_path, keys):
    """A signed publish carries each sums file's .sig (and its versioned name); an unsigned one
    does not carry a .sig left in out/ (it may sign sums written since)."""
    import tarfile

    def names_in(layout: Path) -> set[str]:
        index = json.loads((layout / "index.json").read_text())
        top = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
        manifest = json.loads((layout / "blobs/sha256" / top["manifests"][0]["digest"].split(":")[1]).read_text())
        found: set[str] = set()
        for layer in manifest["layers"]:
            with tarfile.open(layout / "blobs/sha256" / layer["digest"].split(":")[1]) as tar:
                found |= set(tar.getnames())
        return found

    signed = build_py(out, "--oci-dir", str(tmp_path / "signed"), "--sign-key", str(keys["site"]),
                      env={"COSIGN_PASSWORD": KEY_PASSWORD})
    assert signed.returncode == 0, signed.stderr
    release = artifacts.release_of(out, Arch.AMD64)
    assert {"sha256sums-amd64.txt.sig", "sha256sums-arm64.txt.sig",
            f"sha256sums-{release}-x86_64.txt.sig"} <= names_in(tmp_path / "signed")
    unsigned = build_py(out, "--oci-dir", str(tmp_path / "unsigned"))
    assert unsigned.returncode == 0, unsigned.stderr
    assert not {n for n in names_in(tmp_path / "unsigned") if n.endswith(".sig")}
