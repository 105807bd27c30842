"""import-images (embedded images loaded before the agent) and ssh-setup (keys, host key, dropbear)
on the build host, with fake nerdctl, dropbearkey and dropbear. The real ones run in
tests/integration/test_site.py (containerd on the host) and tests/e2e/test_site_vm.py (QEMU)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.image.conftest import Sandbox

EMBED = Path("usr/share/captainos/embedded")
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def embedded(sandbox: Sandbox, names: dict[str, str], *, load_fails: bool = False) -> None:
    """An archive and its list in the root; nerdctl load 'loads' it and inspect answers
    each name with the digest in names (a name absent there is not found)."""
    (sandbox.root / EMBED).mkdir(parents=True)
    (sandbox.root / EMBED / "images.tar").write_bytes(b"tar")
    (sandbox.root / EMBED / "images.list").write_text("".join(f"{n} {DIGEST_A}\n" for n in names))
    table = "\n".join(f'    "{n}") echo "{d}" ;;' for n, d in names.items())
    sandbox.fake("nerdctl", f"""
case "$*" in
  *" version") exit 0 ;;
  *" load --input "*) {'echo "ctr: content digest mismatch" >&2; exit 1' if load_fails else 'exit 0'} ;;
  *" image inspect "*)
    case "${{@: -1}}" in
{table}
    *) echo "no such image" >&2; exit 1 ;;
    esac ;;
esac
""")


def test_embedded_images_are_loaded_checked_listed_and_the_archive_freed(sandbox):
    names = {"docker.io/library/alpine:3": DIGEST_A, "10.0.2.2:1/tink-agent:v1": DIGEST_A}
    embedded(sandbox, names)
    result = sandbox.run("import-images")
    assert result.returncode == 0, result.stderr
    load = [line for line in sandbox.call_lines() if " load " in line]
    assert load == [f"nerdctl --address {sandbox.root}/run/containerd/containerd.sock --namespace tinkerbell "
                    f"load --input {sandbox.root / EMBED / 'images.tar'}"]
    assert (sandbox.root / "run/captainos/embedded-images").read_text().splitlines() == list(names)
    assert not (sandbox.root / EMBED / "images.tar").exists()
    assert "2 embedded image(s) loaded" in (sandbox.tmp / "console").read_text()


def test_an_image_missing_or_other_after_the_load_is_an_error(sandbox):
    embedded(sandbox, {"docker.io/library/alpine:3": DIGEST_B, "quay.io/x/y:1": DIGEST_A})
    (sandbox.root / EMBED / "images.list").write_text(f"docker.io/library/alpine:3 {DIGEST_A}\n"
                                                      f"quay.io/x/y:1 {DIGEST_A}\nghcr.io/gone:1 {DIGEST_A}\n")
    result = sandbox.run("import-images")
    assert result.returncode == 1
    errors = [e for e in result.logs() if e["level"] == "error"]
    assert [e["image"] for e in errors] == ["docker.io/library/alpine:3", "ghcr.io/gone:1"], result.stderr
    assert errors[0]["found"] == DIGEST_B
    assert (sandbox.root / "run/captainos/embedded-images").read_text().splitlines() == ["quay.io/x/y:1"]
    assert "2 embedded image(s) missing" in (sandbox.tmp / "console").read_text()


def test_a_failed_load_keeps_the_archive_and_says_so(sandbox):
    embedded(sandbox, {"quay.io/x/y:1": DIGEST_A}, load_fails=True)
    result = sandbox.run("import-images")
    assert result.returncode == 1
    assert result.messages("error") == ["loading the embedded images failed"]
    assert (sandbox.root / EMBED / "images.tar").exists()
    assert not (sandbox.root / "run/captainos/embedded-images").exists()


def test_no_embedded_images_no_containerd_call(sandbox):
    sandbox.fake("nerdctl", "exit 1")
    result = sandbox.run("import-images")
    assert result.returncode == 0 and sandbox.call_lines() == []


# --- ssh-setup -------------------------------------------------------------------------------------------

def ssh_key(comment: str = "op@site") -> str:
    """A well-formed ed25519 public key line (random key material)."""
    blob = len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + bytes(range(32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def fake_dropbear(sandbox: Sandbox) -> None:
    sandbox.fake("dropbearkey", """
if [[ $1 == -y ]]; then
  printf 'Public key portion is:\\nssh-ed25519 AAAA root@x\\nFingerprint: SHA256:fakeFINGERprint\\n'
else printf 'key' >"${@: -1}"; fi""")
    sandbox.fake("dropbear")


def test_no_key_no_server(sandbox):
    fake_dropbear(sandbox)
    sandbox.cmdline("console=ttyS0")
    result = sandbox.run("ssh-setup")
    assert result.returncode == 0, result.stderr
    assert "no authorized key: the SSH server stays off" in result.messages("info")
    assert not [line for line in sandbox.call_lines() if line.startswith("dropbear")]
    assert not (sandbox.root / "root/.ssh").exists()


def test_keys_from_image_and_command_line_start_a_keys_only_server(sandbox):
    fake_dropbear(sandbox)
    built = sandbox.root / "usr/lib/captainos/ssh/authorized_keys"
    built.parent.mkdir(parents=True)
    built.write_text(f'no-port-forwarding {ssh_key("built")}\n')
    sandbox.cmdline(f'"ssh_authorized_keys={ssh_key("one")}, {ssh_key("two")}" quiet')
    result = sandbox.run("ssh-setup")
    assert result.returncode == 0, result.stderr
    keys = sandbox.root / "root/.ssh/authorized_keys"
    assert keys.read_text().splitlines() == [f'no-port-forwarding {ssh_key("built")}', ssh_key("one"), ssh_key("two")]
    assert keys.stat().st_mode & 0o777 == 0o600 and keys.parent.stat().st_mode & 0o777 == 0o700
    server = [line for line in sandbox.call_lines() if line.startswith("dropbear ")]
    assert server == [f"dropbear -F -E -s -j -k -p 22 -r {sandbox.root}/run/captainos/ssh/host_ed25519"]
    assert any(line.startswith("dropbearkey -t ed25519 -f ") for line in sandbox.call_lines())
    started = next(e for e in result.logs() if e["msg"] == "SSH server starting")
    assert started["fingerprint"] == "SHA256:fakeFINGERprint" and started["keys"] == "3"
    assert "host key ed25519 SHA256:fakeFINGERprint" in (sandbox.tmp / "console").read_text()


@pytest.mark.parametrize("bad", ["ssh-dss AAAAB3NzaC1kc3MAAACBAP", "ssh-ed25519 not*base64",
                                 # a valid blob of another type under this type's name
                                 "ssh-rsa " + ssh_key().split()[1],
                                 "-----BEGIN OPENSSH PRIVATE KEY-----"])
def test_a_bad_key_on_the_command_line_is_one_error_and_left_out(sandbox, bad):
    fake_dropbear(sandbox)
    sandbox.cmdline(f'"ssh_authorized_keys={bad},{ssh_key()}"')
    result = sandbox.run("ssh-setup")
    assert result.returncode == 0, result.stderr
    assert len(result.messages("error")) == 1, result.stderr
    assert (sandbox.root / "root/.ssh/authorized_keys").read_text().splitlines() == [ssh_key()]
    error = next(e for e in result.logs() if e["level"] == "error")
    assert error["entry"] == "1" and error["type"] in ("ssh-dss", "ssh-ed25519", "ssh-rsa", "?"), error
    assert "BEGIN OPENSSH" not in result.stderr  # a pasted private key is never echoed


def test_a_host_key_that_cannot_be_made_is_one_error_and_no_server(sandbox):
    fake_dropbear(sandbox)
    sandbox.fake("dropbearkey", 'echo "Failed to open /run: read-only file system" >&2; exit 1')
    sandbox.cmdline(f'"ssh_authorized_keys={ssh_key()}"')
    result = sandbox.run("ssh-setup")
    assert result.returncode == 1
    assert result.messages("error") == ["cannot make the SSH host key"], result.stderr
    assert not [line for line in sandbox.call_lines() if line.startswith("dropbear ")]


def test_only_bad_keys_means_no_server(sandbox):
    fake_dropbear(sandbox)
    sandbox.cmdline('"ssh_authorized_keys=ssh-ed25519 AAAA"')
    result = sandbox.run("ssh-setup")
    assert result.returncode == 0
    assert len(result.messages("error")) == 1
    assert not [line for line in sandbox.call_lines() if line.startswith("dropbear ")]


def test_the_key_checker_agrees_with_ssh_keygen(sandbox, tmp_path):
    """A key ssh-keygen really made passes; the program's own check is not the only judge."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "real@host", "-f", str(tmp_path / "k")],
                   check=True)
    fake_dropbear(sandbox)
    real = (tmp_path / "k.pub").read_text().strip()
    sandbox.cmdline(f'"ssh_authorized_keys={real}"')
    result = sandbox.run("ssh-setup")
    assert result.returncode == 0 and result.messages("error") == [], result.stderr
    assert (sandbox.root / "root/.ssh/authorized_keys").read_text().strip() == real
