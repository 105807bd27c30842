"""Registry helpers: the CA, server certificates, htpasswd, the config file and the argv."""

import json
import shutil
import ssl
import subprocess
import urllib.request

import pytest
import yaml

from captainos.core import log
from captainos.core.run import Runner
from captainos.lab import registry
from captainos.lab.oci import Credentials

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return registry.ensure_ca(tmp_path_factory.mktemp("cache"), Runner())


def test_config_yaml_with_tls_and_auth(tmp_path):
    text = registry.config_yaml(port=5123, storage=tmp_path / "s", cert=tmp_path / "c.pem", key=tmp_path / "k",
                                htpasswd=tmp_path / "htpasswd")
    doc = yaml.safe_load(text)
    assert doc["version"] == 0.1
    assert doc["http"]["addr"] == "127.0.0.1:5123"
    assert doc["http"]["tls"] == {"certificate": str(tmp_path / "c.pem"), "key": str(tmp_path / "k")}
    assert doc["storage"]["filesystem"]["rootdirectory"] == str(tmp_path / "s")
    assert doc["auth"]["htpasswd"] == {"realm": registry.REALM, "path": str(tmp_path / "htpasswd")}


def test_config_yaml_without_auth_and_other_bind(tmp_path):
    doc = yaml.safe_load(registry.config_yaml(port=1, storage=tmp_path, cert=tmp_path, key=tmp_path, htpasswd=None,
                                              bind="0.0.0.0"))
    assert "auth" not in doc and doc["http"]["addr"] == "0.0.0.0:1"


def test_serve_argv(tmp_path):
    assert registry.serve_argv(tmp_path / "c.yml") == ["/usr/bin/docker-registry", "serve", str(tmp_path / "c.yml")]


def test_server_ext_names_the_guest_and_loopback():
    ext = registry.server_ext(registry.CERT_IPS)
    assert "subjectAltName=IP:10.0.2.2,IP:127.0.0.1,DNS:localhost" in ext
    assert "extendedKeyUsage=serverAuth" in ext and "CA:FALSE" in ext


def test_free_port_is_bindable():
    import socket

    port = registry.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@needs_openssl
def test_ca_is_made_once_and_reused(ca, tmp_path):
    again = registry.ensure_ca(ca.root.parent, Runner())
    assert again == ca
    before = ca.cert.read_bytes()
    registry.ensure_ca(ca.root.parent, Runner())
    assert ca.cert.read_bytes() == before
    assert oct(ca.key.stat().st_mode & 0o777) == "0o600"
    text = subprocess.run(["openssl", "x509", "-in", str(ca.cert), "-noout", "-text"], capture_output=True,
                          text=True, check=True).stdout
    assert "CA:TRUE" in text and "Certificate Sign" in text
    assert not list(ca.root.parent.glob(".e2e-ca.*"))  # no leftovers of the atomic creation


@needs_openssl
def test_server_certificate_verifies_for_both_addresses(ca, tmp_path):
    chain, key = registry.issue_server_cert(ca, Runner(), tmp_path / "tls")
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca.cert), str(tmp_path / "tls" / "leaf.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for ip in ("10.0.2.2", "127.0.0.1"):
        check = subprocess.run(["openssl", "x509", "-in", str(chain), "-noout", "-checkip", ip],
                               capture_output=True, text=True)
        assert "does match" in check.stdout
    ssl.create_default_context().load_cert_chain(str(chain), str(key))  # key matches the certificate
    assert oct(key.stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="apache2-utils not installed")
def test_htpasswd_is_bcrypt_and_password_is_masked(capsys):
    log.set_debug(True)
    try:
        line = registry.htpasswd_line(Runner(), Credentials("captain", "pw-NOT-IN-LOGS"))
    finally:
        log.set_debug(False)
    assert line.startswith("captain:$2y$") and line.endswith("\n")
    err = capsys.readouterr().err
    assert "htpasswd" in err and "pw-NOT-IN-LOGS" not in err


@needs_openssl
def test_registry_object_writes_its_files_without_starting(ca, tmp_path):
    reg = registry.Registry(ca, tmp_path, "open", port=5999)
    assert reg.host_address == "127.0.0.1:5999" and reg.guest_address == "10.0.2.2:5999"
    doc = yaml.safe_load(reg.config_file.read_text())
    assert doc["http"]["addr"] == "127.0.0.1:5999" and "auth" not in doc
    assert (reg.cert_dir / "ca.crt").read_bytes() == ca.cert.read_bytes()
    assert reg.ping() is None  # nothing listens yet
    reg.stop()  # stopping a registry that never started is fine
    assert "no registry log" in reg.log_tail()


def test_config_is_json_compatible_yaml(tmp_path):
    text = registry.config_yaml(port=2, storage=tmp_path / 'we"ird', cert=tmp_path, key=tmp_path, htpasswd=None)
    assert json.loads(text)["storage"]["filesystem"]["rootdirectory"].endswith('we"ird')


def test_https_ping_uses_the_ca(ca, tmp_path, monkeypatch):
    seen = {}

    def fake_urlopen(url, context, timeout):
        seen["url"], seen["ctx"] = url, context
        raise OSError("refused")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    reg = registry.Registry(ca, tmp_path, "x", port=6000)
    assert reg.ping() is None
    assert seen["url"] == "https://127.0.0.1:6000/v2/" and seen["ctx"].verify_mode == ssl.CERT_REQUIRED


def test_server_certificates_name_ipv6_addresses_and_host_names():
    ext = registry.server_ext(("10.77.0.1", "fd77::1", "tinkerbell6.lab"))
    assert "subjectAltName=IP:10.77.0.1,IP:fd77::1,DNS:tinkerbell6.lab,DNS:localhost" in ext


@needs_openssl
def test_a_lab_registry_listens_on_every_address_of_its_namespace(ca, tmp_path):
    reg = registry.Registry(ca, tmp_path, "lab", port=5000, lab_address="10.77.0.1", also=("fd77::1", "t6.lab"))
    assert yaml.safe_load(reg.config_file.read_text())["http"]["addr"] == "[::]:5000"
    assert reg.host_address == "10.77.0.1:5000"
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(reg.cert)],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:FD77:0:0:0:0:0:0:1" in text and "DNS:t6.lab" in text, text
