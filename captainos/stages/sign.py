"""Signatures with sigstore's cosign: key-based, offline, no transparency log.

cosign is built from the Go module proxy at its pinned version (`go install`, every module
checked against the checksum database) and cached by its inputs. `publish --sign-key KEY`
signs each `sha256sums-<arch>.txt` (the signature goes beside it, `.sig`, and into the image)
and then the pushed image, every platform of it. The key's password comes from
COSIGN_PASSWORD, as cosign reads it; never from the command line.

cosign looks for Sigstore's trust root on the Internet (TUF) even when a key is given: it
is pointed at a closed loopback port instead, so it never leaves the machine.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import golang

LDFLAGS = "-s -w"
NO_TUF = "http://127.0.0.1:9"  # the discard port: closed, so the TUF lookup fails at once, locally
CERTS_D = Path("/etc/containers/certs.d")  # where the host trusts a registry's CA (as skopeo does)


def install_argv(go: str) -> list[str]:
    return [go, "install", "-trimpath", f"-ldflags={LDFLAGS}", f"{pins.COSIGN_PACKAGE}@{pins.COSIGN.version}"]


def build(cfg: Config, runner: Runner, force: bool = False) -> Path:
    """The cosign binary for this host, built once per pinned version and Go."""
    arch = Arch.host()
    env = golang.go_env(cfg.cache_dir, arch)
    parts = {"module": pins.COSIGN.query, "module_h1": pins.COSIGN.h1, "package": pins.COSIGN_PACKAGE,
             "ldflags": LDFLAGS, "go": golang.go_version(runner, cfg.cache_dir, arch), "arch": arch.value}

    def produce(work: Path) -> None:
        go = golang.go_binary()
        with log.stage("cosign", f"{pins.COSIGN.query} ({parts['go']})"):
            result = runner.run([go, "mod", "download", "-json", pins.COSIGN.query], env=env, cwd=work, capture=True)
            golang.verify(golang.parse_download(result.stdout), (pins.COSIGN,))
            runner.run(install_argv(go), env={**env, "GOBIN": str(work)}, cwd=work, log_file=work / "build.log")
            log.info(f"    cosign: {log.human_bytes((work / 'cosign').stat().st_size)}")

    entry = cache.cached(cfg.cache_dir, "cosign", arch.value, parts, force=force or cfg.force("publish"),
                         produce=produce)
    binary = entry / "cosign"
    if not os.access(binary, os.X_OK):
        raise CaptainError(f"cached cosign {binary} is missing", f"remove {entry} and build again")
    return binary


def check_key(key: Path) -> None:
    """One line before any work: the key file exists and its password is in COSIGN_PASSWORD."""
    if not key.is_file():
        raise CaptainError(f"signing key {key} does not exist",
                           "make a pair with 'cosign generate-key-pair' (docs/publishing.md, \"Signatures\")")
    head = key.read_bytes()[:64]
    if b"ENCRYPTED SIGSTORE PRIVATE KEY" not in head and b"ENCRYPTED COSIGN PRIVATE KEY" not in head:
        raise CaptainError(f"{key} is not a cosign private key", "give the .key of 'cosign generate-key-pair'")
    if "COSIGN_PASSWORD" not in os.environ:
        raise CaptainError("COSIGN_PASSWORD is not set", "export the key's password (empty if it has none); "
                           "it is never taken from the command line")


@contextmanager
def cosign_env() -> Iterator[dict[str, str]]:
    """What cosign runs with: the key's password, the TUF lookup kept on loopback, its cache in
    a private temp dir, and the registry credentials skopeo pushed with. cosign's library reads
    ~/.docker/config.json before REGISTRY_AUTH_FILE, so an auth file named by
    REGISTRY_AUTH_FILE is handed to it as DOCKER_CONFIG's config.json (mode 0600 in a 0700 dir)."""
    from captainos.stages import oci

    with tempfile.TemporaryDirectory(prefix="captainos-cosign-") as tmp:
        env = {"TUF_MIRROR": NO_TUF, "TUF_ROOT": str(Path(tmp) / "tuf"), **oci.auth_env()}
        auth = os.environ.get("REGISTRY_AUTH_FILE")
        if auth and Path(auth).is_file():
            docker = Path(tmp) / "docker"
            docker.mkdir(mode=0o700)
            (docker / "config.json").touch(mode=0o600)
            (docker / "config.json").write_bytes(Path(auth).read_bytes())
            env["DOCKER_CONFIG"] = str(docker)
        if "COSIGN_PASSWORD" in os.environ:
            env["COSIGN_PASSWORD"] = os.environ["COSIGN_PASSWORD"]
        yield env


def _cacert(ref: str) -> list[str]:
    ca = CERTS_D / ref.split("/", 1)[0] / "ca.crt"
    return ["--registry-cacert", str(ca)] if ca.is_file() else []


def signature_of(blob: Path) -> Path:
    return blob.with_name(f"{blob.name}.sig")


def sign_blob_argv(cosign: Path, key: Path, blob: Path, output: Path) -> list[str]:
    return [str(cosign), "sign-blob", "--yes", "--tlog-upload=false", "--key", str(key),
            "--output-signature", str(output), str(blob)]


def sign_image_argv(cosign: Path, key: Path, ref: str) -> list[str]:
    """ref is REGISTRY/REPO@sha256:...: what is signed is that digest, never a moving tag."""
    return [str(cosign), "sign", "--yes", "--recursive", "--tlog-upload=false", "--key", str(key), *_cacert(ref),
            ref]


def verify_blob_argv(cosign: Path, public_key: Path, blob: Path) -> list[str]:
    return [str(cosign), "verify-blob", "--insecure-ignore-tlog", "--key", str(public_key),
            "--signature", str(signature_of(blob)), str(blob)]


def verify_image_argv(cosign: Path, public_key: Path, ref: str) -> list[str]:
    return [str(cosign), "verify", "--insecure-ignore-tlog", "--key", str(public_key), *_cacert(ref), ref]


def sign_blobs(cosign: Path, key: Path, blobs: list[Path]) -> None:
    """<blob>.sig beside each blob, written under a temp name and renamed: a signature on disk
    is always a whole one."""
    with cosign_env() as env:
        for blob in blobs:
            signature = signature_of(blob)
            tmp = cache.temp_beside(signature)
            try:
                Runner().run(sign_blob_argv(cosign, key, blob, tmp), env=env, capture=True)
                os.replace(tmp, signature)
            finally:
                tmp.unlink(missing_ok=True)
            log.info(f"    signed {blob.name}: {signature.name}")


def sign_image(cosign: Path, key: Path, ref: str) -> None:
    with cosign_env() as env:
        Runner().run(sign_image_argv(cosign, key, ref), env=env, capture=True)
    log.info(f"    signed {ref} (every platform)")
