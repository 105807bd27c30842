"""tink-agent-setup against the real thing: containerd 2.2.1 and nerdctl 2.2.1 of our tools
stage, running on the build host, pulling from the real registry (docker-registry 2.8, TLS,
htpasswd). The host tests (tests/image) feed the program messages we wrote; these are the
messages containerd really prints, and the binaries nerdctl really copies out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from captainos.core.config import Arch, Config
from captainos.core.run import Runner
from captainos.lab import oci, registry
from captainos.lab.containerd import Containerd
from captainos.lab.oci import Credentials, Image, Member
from tests.image.conftest import LIB, PROGRAMS, Result
from tests.image.test_tink_agent import ELF_ARM64

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("skopeo", "openssl", "htpasswd", "docker-registry")),
                       reason="needs skopeo, openssl, apache2-utils and docker-registry (./build.py setup)"),
]

CREDS = Credentials("captain", "setup-pw-4711")
USR_BIN = (Member("usr", 0o755), Member("usr/bin", 0o755))


@pytest.fixture(scope="module")
def tools_bin(lab_cfg: Config) -> Path:
    from captainos.stages import pipeline

    return pipeline.build_tools(lab_cfg) / "tree" / "usr" / "bin"


@pytest.fixture(scope="module")
def containerd(tools_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private containerd: its own root, state and socket; CRI off as in the image."""
    with Containerd(tools_bin, tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon.socket


@pytest.fixture(scope="module")
def registries(lab_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, registry.Registry]]:
    """An open registry holding one image per case, and one that wants CREDS."""
    work = tmp_path_factory.mktemp("registries")
    ca = registry.ensure_ca(lab_cfg.cache_dir, Runner())
    true = Path("/bin/true").read_bytes()
    cases = {
        "good": Image(Arch.AMD64, (Member("tink-agent", 0o755, true),)),
        "elsewhere": Image(Arch.AMD64, (Member("usr", 0o755), Member("usr/bin", 0o755),
                                        Member("usr/bin/tink-agent", 0o755, true))),
        "arm64-binary": Image(Arch.AMD64, (Member("tink-agent", 0o755, ELF_ARM64),)),
        "symlink": Image(Arch.AMD64, (Member("tink-agent", 0o777, target="/etc/shadow"),)),
        "symlink-inside": Image(Arch.AMD64, (Member("real", 0o755, true), Member("tink-agent", 0o777, target="real"))),
        "directory": Image(Arch.AMD64, (Member("tink-agent", 0o755), Member("tink-agent/x", 0o644, b"x"))),
        "none": Image(Arch.AMD64, (Member("opt", 0o755), Member("opt/other", 0o755, true))),
        "arm64-single": Image(Arch.ARM64, (Member("tink-agent", 0o755, ELF_ARM64),)),
        # Layers: the top-most copy wins; whiteouts and opaque directories hide what is below.
        "upper": Image(Arch.AMD64, (*USR_BIN, Member("usr/bin/tink-agent", 0o755, true)),
                       below=((*USR_BIN, Member("usr/bin/tink-agent", 0o755, ELF_ARM64)),)),
        "whiteout": Image(Arch.AMD64, (*USR_BIN, Member(".wh.tink-agent", 0o644, b""),
                                           Member("usr/bin/tink-agent", 0o755, true)),
                          below=((Member("tink-agent", 0o755, ELF_ARM64),),)),
        "opaque": Image(Arch.AMD64, (Member("usr", 0o755), Member("usr/bin", 0o755),
                                     Member("usr/bin/.wh..wh..opq", 0o644, b""), Member("usr/local", 0o755),
                                     Member("usr/local/bin", 0o755), Member("usr/local/bin/tink-agent", 0o755, true)),
                        below=((*USR_BIN, Member("usr/bin/tink-agent", 0o755, ELF_ARM64)),)),
        "hardlink": Image(Arch.AMD64, (Member("real", 0o755, true), Member("tink-agent", 0o755, link="real"))),
        "plain-tar": Image(Arch.AMD64, (Member("tink-agent", 0o755, true),), gzip=False),
        "link-loop": Image(Arch.AMD64, (Member("a", 0o777, target="tink-agent"),
                                        Member("tink-agent", 0o777, target="a"))),
    }
    with registry.Registry(ca, work, "open") as open_reg, \
            registry.Registry(ca, work, "auth", creds=CREDS) as auth_reg:
        for name, image in cases.items():
            oci.write_layout(image, work / "layouts" / name, "v1")
            oci.push(Runner(), work / "layouts" / name, "v1", f"{open_reg.host_address}/agent-{name}:v1",
                     cert_dir=open_reg.cert_dir)
        oci.push(Runner(), work / "layouts" / "good", "v1", f"{auth_reg.host_address}/agent-good:v1",
                 cert_dir=auth_reg.cert_dir, creds=CREDS)
        # A layer compressed with zstd (tar in the image cannot read it). Its own bytes: skopeo
        # would reuse a plain layer of the same digest already in the registry.
        oci.write_layout(Image(Arch.AMD64, (Member("tink-agent", 0o755, true), Member("zstd", 0o644, b"")), gzip=False),
                         work / "layouts" / "zstd", "v1")
        Runner().run(["skopeo", "copy", "--quiet", "--dest-compress", "--dest-compress-format", "zstd",
                      "--dest-cert-dir", str(open_reg.cert_dir), f"oci:{work / 'layouts' / 'zstd'}:v1",
                      f"docker://{open_reg.host_address}/agent-zstd:v1"], capture=True)
        # A multi-platform index that lists only arm64.
        index_layout(work / "layouts" / "arm64-single", work / "layouts" / "arm64-index")
        Runner().run(["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-cert-dir",
                      str(open_reg.cert_dir), f"oci:{work / 'layouts' / 'arm64-index'}:v1",
                      f"docker://{open_reg.host_address}/agent-arm64-index:v1"], capture=True)
        yield {"open": open_reg, "auth": auth_reg}


def index_layout(single: Path, dest: Path) -> None:
    """Copy an OCI layout of one arm64 manifest, wrapping the manifest in an image index that
    names its platform (what a multi-arch release without amd64 looks like)."""
    shutil.copytree(single, dest)
    descriptor = json.loads((single / "index.json").read_text())["manifests"][0]
    descriptor.pop("annotations")
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{**descriptor, "platform": {"architecture": "arm64", "os": "linux",
                                                                  "variant": "v8"}}]}).encode()
    digest = hashlib.sha256(index).hexdigest()
    (dest / "blobs" / "sha256" / digest).write_bytes(index)
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}", "size": len(index),
        "annotations": {oci.REF_NAME: "v1"}}]}))


class Setup:
    """tink-agent-setup as systemd runs it (working directory "/"), with ROOT, the command
    line and the console in a temp dir, talking to the private containerd."""

    def __init__(self, tmp: Path, socket: Path, tools_bin: Path, regs: dict[str, registry.Registry]) -> None:
        self.tmp, self.root = tmp, tmp / "root"
        for reg in regs.values():  # trust the test CA the way the image trusts its own CAs
            hosts = self.root / "etc/containerd/certs.d" / reg.host_address / "hosts.toml"
            hosts.parent.mkdir(parents=True)
            hosts.write_text(f'server = "https://{reg.host_address}"\n[host."https://{reg.host_address}"]\n'
                             f'  capabilities = ["pull", "resolve"]\n  ca = "{reg.cert_dir / "ca.crt"}"\n')
        (tmp / "nerdctl.toml").write_text(f'data_root = "{tmp}/nerdctl"\n')
        self.env = {"PATH": f"{tools_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "ROOT": str(self.root),
                    "CMDLINE_FILE": str(tmp / "cmdline"), "CAPTAINOS_LIB": str(LIB),
                    "CONTAINERD_SOCKET": str(socket), "CONTAINERD_ROOT": str(socket.parent / "root"),
                    "NERDCTL_TOML": str(tmp / "nerdctl.toml"),
                    "CAP_CONSOLE": str(tmp / "console"), "BACKOFF_MIN": "1", "BACKOFF_MAX": "1",
                    "HOME": str(tmp)}

    def run(self, cmdline: str, *, until: str | None = None, timeout: float = 120) -> Result:
        """Run to the end, or (until=) kill it once that text is in its log: a pull that
        cannot succeed retries forever."""
        (self.tmp / "cmdline").write_text(cmdline + "\n")
        err = self.tmp / "stderr"
        with err.open("w") as sink:
            proc = subprocess.Popen(["bash", str(PROGRAMS / "tink-agent-setup")], env=self.env, cwd="/",
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink, text=True)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if until is not None and until in err.read_text():
                    time.sleep(1.5)  # a second attempt, logged as such
                    proc.kill()
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
                pytest.fail(f"tink-agent-setup still running after {timeout}s:\n{err.read_text()[-3000:]}")
            proc.wait()
        return Result(proc.returncode, "", err.read_text())

    @property
    def console(self) -> str:
        path = self.tmp / "console"
        return path.read_text() if path.exists() else ""

    @property
    def agent(self) -> Path:
        return self.root / "run/captainos/tink-agent"

    def images(self) -> list[str]:
        """The image names containerd holds in namespace tinkerbell."""
        out = subprocess.run(["nerdctl", "--address", self.env["CONTAINERD_SOCKET"], "--namespace", "tinkerbell",
                              "images", "--format", "{{.Repository}}:{{.Tag}}"], env=self.env,
                             capture_output=True, text=True, check=True).stdout
        return out.split()


@pytest.fixture
def setup(tmp_path, containerd, tools_bin, registries) -> Setup:
    return Setup(tmp_path, containerd, tools_bin, registries)


def ref(regs: dict[str, registry.Registry], name: str, which: str = "open") -> str:
    return f"{regs[which].host_address}/agent-{name}:v1"


# A symbolic link inside the image is followed inside the image (as a container sees it): a
# link to a binary in the image gives that binary (a regular file on the host), never a link.
# The pulled image is removed afterwards: its layers would take RAM for nothing.
@pytest.mark.parametrize("name", ["good", "elsewhere", "symlink-inside", "upper", "whiteout", "opaque", "hardlink",
                                  "plain-tar", "zstd"])
def test_the_agent_is_pulled_extracted_and_checked(setup, registries, name):
    result = setup.run(f"tink_worker_image={ref(registries, name)}")
    assert result.returncode == 0, result.stderr
    assert setup.agent.read_bytes() == Path("/bin/true").read_bytes()
    assert setup.agent.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in setup.agent.parent.iterdir()) == ["tink-agent"]
    assert "removed the agent image from containerd" in result.messages("info"), result.stderr
    assert not [image for image in setup.images() if f"agent-{name}" in image or "captainos.local" in image]
    converted = [m for m in result.messages("info") if m.startswith("the agent image has compressed layers")]
    assert len(converted) == (name == "zstd"), result.stderr


@pytest.mark.parametrize(("name", "why"), [("arm64-binary", "built for another architecture"),
                                           # containerd pulls a single-manifest image of any
                                           # platform; the ELF check is what refuses it.
                                           ("arm64-single", "built for another architecture"),
                                           ("directory", "a directory"),
                                           ("none", "the agent image has no tink-agent binary"),
                                           # The link is followed inside the image, where
                                           # /etc/shadow does not exist: nothing to copy.
                                           ("symlink", "the agent image has no tink-agent binary"),
                                           ("link-loop", "the agent image has no tink-agent binary")])
def test_an_unusable_agent_is_refused_once(setup, registries, name, why):
    shadow_mode = Path("/etc/shadow").stat().st_mode
    result = setup.run(f"tink_worker_image={ref(registries, name)}")
    assert Path("/etc/shadow").stat().st_mode == shadow_mode
    assert result.returncode == 2, result.stderr
    errors = result.messages("error")
    assert len(errors) == 1 and why in errors[0], result.stderr
    assert not setup.agent.parent.exists() or list(setup.agent.parent.iterdir()) == []
    assert "refusing the agent image" in setup.console


@pytest.mark.parametrize(("case", "reason"), [
    ("missing", "the image does not exist on the registry (not found)"),
    ("unauthorized", "the registry refused access (unauthorized)"),
    ("arm64-index", "the image has no variant for this machine"),
])
def test_a_pull_that_cannot_heal_says_why_once(setup, registries, case, reason):
    image = {"missing": f"{registries['open'].host_address}/agent-good:v404",
             "unauthorized": ref(registries, "good", "auth"),
             "arm64-index": ref(registries, "arm64-index")}[case]
    result = setup.run(f"tink_worker_image={image}", until="pull failed again")
    errors = [e for e in result.logs() if e["level"] == "error"]
    assert len(errors) == 1, result.stderr
    assert errors[0]["msg"].startswith("cannot pull the agent image: " + reason), errors[0]
    assert reason in setup.console


def test_credentials_pull_and_are_gone(setup, registries):
    cmdline = (f"tink_worker_image={ref(registries, 'good', 'auth')} registry_username={CREDS.username} "
               f"registry_password={CREDS.password}")
    result = setup.run(cmdline)
    assert result.returncode == 0, result.stderr
    assert setup.agent.is_file()
    assert not (setup.root / "run/captainos/registry-auth").exists()
    assert CREDS.password not in result.stderr
