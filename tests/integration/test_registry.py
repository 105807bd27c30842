"""The real registry (docker-registry 2.8) with TLS and htpasswd, fed with the real agent image by skopeo."""

import json
import shutil
import subprocess

import pytest

from captainos.core import config
from captainos.core.run import Runner
from captainos.lab import agent, oci, registry, vm
from captainos.lab.oci import Credentials

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("skopeo", "openssl", "htpasswd", "docker-registry")),
                       reason="needs skopeo, openssl, apache2-utils and docker-registry (./build.py setup)"),
]


@pytest.fixture(scope="module")
def cfg():
    return config.load()  # the user's cache: the agent build (about 2 minutes cold) is shared


@pytest.fixture(scope="module")
def layouts(cfg):
    return vm.images(cfg, Runner())


def inspect(reg, ref, *extra):
    return subprocess.run(["skopeo", "inspect", "--cert-dir", str(reg.cert_dir), *extra, f"docker://{ref}"],
                          capture_output=True, text=True, timeout=60)


def test_agent_image_through_tls_and_auth(cfg, layouts, tmp_path):
    ca = registry.ensure_ca(cfg.cache_dir, Runner())
    creds = Credentials("captain", "integration-pw-123")
    with registry.Registry(ca, tmp_path, "open") as open_reg, \
            registry.Registry(ca, tmp_path, "auth", creds=creds) as auth_reg:
        assert open_reg.ping() == 200 and auth_reg.ping() == 401
        ref = f"{open_reg.host_address}/tink-agent:{vm.AGENT_TAG}"
        oci.push(Runner(), layouts / "agent", vm.AGENT_TAG, ref, cert_dir=open_reg.cert_dir)
        seen = inspect(open_reg, ref)
        assert seen.returncode == 0, seen.stderr
        info = json.loads(seen.stdout)
        assert info["Architecture"] == cfg.arch.go_arch() and info["Os"] == "linux"
        config_blob = subprocess.run(["skopeo", "inspect", "--config", "--cert-dir", str(open_reg.cert_dir),
                                      f"docker://{ref}"], capture_output=True, text=True, check=True).stdout
        assert json.loads(config_blob)["config"]["Entrypoint"] == ["/tink-agent"]

        auth_ref = f"{auth_reg.host_address}/tink-agent:latest"
        oci.push(Runner(), layouts / "agent", vm.AGENT_TAG, auth_ref, cert_dir=auth_reg.cert_dir, creds=creds)
        anonymous = inspect(auth_reg, auth_ref)
        assert anonymous.returncode != 0 and "authentication required" in anonymous.stderr
        wrong = inspect(auth_reg, auth_ref, "--creds", "captain:wrong")
        assert wrong.returncode != 0
        right = inspect(auth_reg, auth_ref, "--creds", f"captain:{creds.password}")
        assert right.returncode == 0, right.stderr
        assert json.loads(right.stdout)["Digest"] == info["Digest"]  # same bytes in both registries
    assert open_reg.ping() is None  # stopped
    assert "integration-pw-123" not in (tmp_path / "auth" / "registry.log").read_text()
    assert "integration-pw-123" not in (tmp_path / "auth" / "config.yml").read_text()


def test_unverified_tls_is_refused(cfg, tmp_path):
    """Without the CA, a client refuses the registry: the guest must really trust ca.pem."""
    ca = registry.ensure_ca(cfg.cache_dir, Runner())
    with registry.Registry(ca, tmp_path, "open") as reg:
        result = subprocess.run(["skopeo", "inspect", "--cert-dir", str(tmp_path / "empty"),
                                 f"docker://{reg.host_address}/nothing:here"], capture_output=True, text=True)
        assert result.returncode != 0 and "certificate" in result.stderr


def test_registry_restarts_with_the_same_content(cfg, layouts, tmp_path):
    ca = registry.ensure_ca(cfg.cache_dir, Runner())
    reg = registry.Registry(ca, tmp_path, "open").start()
    try:
        ref = f"{reg.host_address}/{vm.ACTION_REPO}:{vm.ACTION_TAG}"
        oci.push(Runner(), layouts / "busybox", vm.ACTION_TAG, ref, cert_dir=reg.cert_dir)
        reg.stop()
        assert inspect(reg, ref).returncode != 0
        reg.start()
        assert inspect(reg, ref).returncode == 0
    finally:
        reg.stop()


def test_agent_binary_is_static_for_the_target(cfg):
    binary = agent.build(cfg, Runner()) / agent.BINARY
    head = binary.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == cfg.arch.elf_machine()
    out = subprocess.run(["file", str(binary)], capture_output=True, text=True).stdout if shutil.which("file") else ""
    assert "statically linked" in out or not out
