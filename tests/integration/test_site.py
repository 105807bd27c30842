"""Embedded images and registry mirrors against the real thing, on the build host: skopeo pulls
from the real registry (docker-registry 2.8, TLS) the way `--embed-images` does at build
time, and the real containerd 2.2.1 and nerdctl 2.2.1 of our tools stage load the archive
through the image's own import-images, or pull through a mirror written by tink-agent-setup.
The VM proof is tests/e2e/test_site_vm.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from captainos.core import cache
from captainos.core.config import Arch, Config
from captainos.core.run import Runner
from captainos.lab import oci, registry
from captainos.stages import site
from tests.image.conftest import LIB, PROGRAMS, Result
from tests.integration.test_agent_setup import Setup, containerd, ref, registries, tools_bin  # noqa: F401

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("skopeo", "openssl", "docker-registry")),
                       reason="needs skopeo, openssl and docker-registry (./build.py setup)"),
]


@pytest.fixture(scope="module")
def trusted(registries) -> Iterator[dict[str, registry.Registry]]:  # noqa: F811
    """The build host trusts the test registries the way an operator's host trusts theirs:
    /etc/containers/certs.d/HOST:PORT/ca.crt (removed afterwards)."""
    made = []
    work = registries["open"].workdir
    oci.write_layout(oci.busybox_image(Arch.AMD64), work / "layouts" / "busybox", "v1")
    oci.push(Runner(), work / "layouts" / "busybox", "v1", f"{registries['open'].host_address}/actions-busybox:v1",
             cert_dir=registries["open"].cert_dir)
    for reg in registries.values():
        path = Path("/etc/containers/certs.d") / reg.host_address
        path.mkdir(parents=True)
        made.append(path)
        shutil.copy(reg.cert_dir / "ca.crt", path / "ca.crt")
    try:
        yield registries
    finally:
        for path in made:
            shutil.rmtree(path)


def embed_list(tmp_path: Path, lines: list[str]) -> Config:
    listing = tmp_path / "images.txt"
    listing.write_text("# embedded for the test\n" + "\n".join(lines) + "\n")
    return Config(embed_images=listing, cache_dir=tmp_path / "cache")


def stage(cfg: Config, tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    assert cfg.embed_images is not None
    embeds = site.parse_embed_list(cfg.embed_images)
    tree, work = tmp_path / "tree", tmp_path / "work"
    work.mkdir(parents=True)
    return tree, site.stage_embedded(cfg, Runner(), embeds, site.source_digests(Runner(), embeds), tree, work)


class Importer:
    """import-images as systemd runs it, against the private containerd."""

    def __init__(self, tmp: Path, socket: Path, tools_bin: Path, tree: Path) -> None:  # noqa: F811
        self.tmp, self.root = tmp, tree
        (tmp / "nerdctl.toml").write_text(f'data_root = "{tmp}/nerdctl"\n')
        self.env = {"PATH": f"{tools_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "ROOT": str(tree),
                    "CMDLINE_FILE": str(tmp / "cmdline"), "CAPTAINOS_LIB": str(LIB),
                    "CONTAINERD_SOCKET": str(socket), "NERDCTL_TOML": str(tmp / "nerdctl.toml"),
                    "CAP_CONSOLE": str(tmp / "console"), "HOME": str(tmp)}
        self.nerdctl = [str(tools_bin / "nerdctl"), "--address", str(socket), "--namespace", "tinkerbell"]

    def run(self) -> Result:
        proc = subprocess.run(["bash", str(PROGRAMS / "import-images")], env=self.env, cwd="/", capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def digest(self, name: str) -> str:
        out = subprocess.run([*self.nerdctl, "image", "inspect", "--mode", "native", "--format",
                              "{{.Image.Target.Digest}}", name], env=self.env, capture_output=True, text=True,
                             check=False)
        # One line per image holding that manifest (two names may share one).
        return " ".join(sorted(set(out.stdout.split()))) if out.returncode == 0 else ""

    def run_image(self, name: str, *cmd: str) -> str:
        out = subprocess.run([*self.nerdctl, "run", "--rm", "--net", "none", name, *cmd], env=self.env,
                             capture_output=True, text=True, check=False, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout


def test_embedded_images_load_under_their_fully_qualified_names(trusted, containerd, tools_bin, tmp_path):  # noqa: F811
    good, busybox = ref(trusted, "good"), f"{trusted['open'].host_address}/actions-busybox:v1"
    cfg = embed_list(tmp_path, [good, f"{busybox}  hello:embedded   # retagged, short name",
                                f"{good} 10.0.2.2:1/tinkerbell/tink-agent:v0.25.0"])
    tree, record = stage(cfg, tmp_path)
    # One layout: the blobs the first and third image share are stored once.
    with __import__("tarfile").open(tree / site.EMBED_ARCHIVE) as tar:
        blobs = [m.name for m in tar.getmembers() if m.name.startswith("blobs/sha256/")]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert len(blobs) == len(set(blobs)) == 6  # 2 images x (manifest, config, layer); good's are shared
    assert [m["annotations"][site.IMAGE_NAME] for m in index["manifests"]] == [
        good, "docker.io/library/hello:embedded", "10.0.2.2:1/tinkerbell/tink-agent:v0.25.0"]

    importer = Importer(tmp_path, containerd, tools_bin, tree)
    result = importer.run()
    assert result.returncode == 0, result.stderr
    for item in record:
        assert importer.digest(item["target"]) == item["manifest"], item
    assert not (tree / site.EMBED_ARCHIVE).exists()
    assert (tree / "run/captainos/embedded-images").read_text().split() == [r["target"] for r in record]
    # Unpacked for this machine: the image runs, under the name a workflow would give it.
    assert importer.run_image("hello:embedded", "echo", "embedded-ok").strip() == "embedded-ok"


def test_the_same_images_give_the_same_archive(trusted, tmp_path):
    cfg = embed_list(tmp_path, [ref(trusted, "good"), ref(trusted, "elsewhere")])
    first, _ = stage(cfg, tmp_path / "a")
    second, _ = stage(cfg, tmp_path / "b")
    assert cache.sha256_file(first / site.EMBED_ARCHIVE) == cache.sha256_file(second / site.EMBED_ARCHIVE)


def test_a_tag_that_moves_after_the_digest_was_read_embeds_what_was_read(trusted, tmp_path):
    """The cache key holds the manifest digest read first; the copy is by that digest, so a tag
    pushed again in between cannot put other content under the key."""
    reg = trusted["open"]
    target = f"{reg.host_address}/moving:v1"
    images = {word: oci.Image(arch=Arch.AMD64, members=(oci.Member("which", 0o644, word.encode()),))
              for word in ("first", "second")}
    manifests = {word: oci.write_layout(image, tmp_path / word, "v1") for word, image in images.items()}
    oci.push(Runner(), tmp_path / "first", "v1", target, cert_dir=reg.cert_dir)
    cfg = embed_list(tmp_path, [target])
    assert cfg.embed_images is not None
    embeds = site.parse_embed_list(cfg.embed_images)
    digests = site.source_digests(Runner(), embeds)
    oci.push(Runner(), tmp_path / "second", "v1", target, cert_dir=reg.cert_dir)  # the tag moves
    assert site.source_digests(Runner(), embeds) != digests
    work = tmp_path / "work"
    work.mkdir()
    record = site.stage_embedded(cfg, Runner(), embeds, digests, tmp_path / "tree", work)
    assert record[0]["manifest"] == digests[0] == manifests["first"]


def test_an_image_the_registry_does_not_have_is_one_line(trusted, tmp_path):
    cfg = embed_list(tmp_path, [f"{trusted['open'].host_address}/agent-good:v404"])
    with pytest.raises(site.CaptainError, match=r"cannot read the embedded image .*agent-good:v404 from its registry"):
        site.source_digests(Runner(), site.parse_embed_list(cfg.embed_images))  # type: ignore[arg-type]


def test_the_agent_image_through_a_mirror(trusted, containerd, tools_bin, tmp_path):  # noqa: F811
    """registry_mirrors=<a registry that does not exist>=https://<the test registry>: nerdctl
    pulls the agent image through the mirror (the registry's own name refuses connections)."""
    reg = trusted["open"]
    setup = Setup(tmp_path, containerd, tools_bin, trusted)
    # The image trusts the registry's CA through its store; on this host Go's SSL_CERT_FILE does.
    setup.env["SSL_CERT_FILE"] = str(reg.cert_dir / "ca.crt")
    upstream = "127.0.0.1:1"  # nothing listens there
    result = setup.run(f"tink_worker_image={upstream}/agent-good:v1 "
                       f"registry_mirrors={upstream}=https://{reg.host_address}", timeout=60)
    assert result.returncode == 0, result.stderr
    assert setup.agent.read_bytes() == Path("/bin/true").read_bytes()
    hosts = (setup.root / "etc/containerd/certs.d" / upstream / "hosts.toml").read_text()
    assert f'[host."https://{reg.host_address}"]' in hosts
    served = [line for line in reg.log_file.read_text().splitlines()
              if "/v2/agent-good/manifests/v1" in line and "skopeo" not in line]
    assert served, "the mirror was not asked for the agent image"


def test_a_mirror_of_an_insecure_registry_is_still_verified(trusted, containerd, tools_bin, tmp_path):  # noqa: F811
    """insecure_registries= names the registry, not its mirrors: nerdctl's --insecure-registry
    turns verification off for every host containerd has no setting for, so a mirror whose
    certificate the machine does not trust must still be refused (no SSL_CERT_FILE here: the
    test CA is not trusted for the mirror)."""
    reg = trusted["open"]
    setup = Setup(tmp_path, containerd, tools_bin, trusted)
    upstream = "127.0.0.1:1"  # nothing listens there
    before = len(reg.log_file.read_text())
    result = setup.run(f"tink_worker_image={upstream}/agent-good:v1 insecure_registries={upstream} "
                       f"registry_mirrors={upstream}=https://{reg.host_address}", until="retry_in", timeout=90)
    assert not setup.agent.exists(), result.stderr
    hosts = (setup.root / "etc/containerd/certs.d" / upstream / "hosts.toml").read_text()
    mirror = hosts[hosts.index(f'[host."https://{reg.host_address}"]'):].split("\n\n")[0]
    assert "skip_verify = false" in mirror, hosts
    served = [line for line in reg.log_file.read_text()[before:].splitlines() if "/v2/agent-good/manifests/v1" in line]
    assert not served, "the untrusted mirror served the agent image"


def test_setup_uses_an_embedded_agent_image_without_a_registry(trusted, containerd, tools_bin, tmp_path):  # noqa: F811
    """The agent image loaded by import-images, under a name no registry answers for: the real
    nerdctl finds it (a pull would be refused at 127.0.0.1:1) and the agent is extracted."""
    name = "127.0.0.1:1/tinkerbell/tink-agent:embedded"
    cfg = embed_list(tmp_path, [f"{ref(trusted, 'good')} {name}"])
    tree, _ = stage(cfg, tmp_path)
    importer = Importer(tmp_path, containerd, tools_bin, tree)
    assert importer.run().returncode == 0
    setup = Setup(tmp_path / "setup", containerd, tools_bin, trusted)
    # The same machine: import-images's list where tink-agent-setup reads it.
    (setup.root / "run/captainos").mkdir(parents=True)
    shutil.copy(tree / "run/captainos/embedded-images", setup.root / "run/captainos/embedded-images")
    result = setup.run(f"tink_worker_image={name}", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "the agent image is already here (embedded), not pulling it" in result.messages("info")
    assert "pulling the agent image" not in result.messages("info")
    assert setup.agent.read_bytes() == Path("/bin/true").read_bytes()


def test_a_single_platform_image_of_another_architecture_is_refused_at_build_time(trusted, tmp_path):
    """skopeo copies a single-manifest arm64 image into an amd64 build without a word; the
    build refuses it (the machine would fail to load it at boot)."""
    cfg = embed_list(tmp_path, [ref(trusted, "arm64-single")])
    with pytest.raises(site.CaptainError, match=r"agent-arm64-single:v1 is for arm64, not amd64"):
        stage(cfg, tmp_path)
