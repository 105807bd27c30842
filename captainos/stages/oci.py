"""OCI image layouts written byte for byte reproducibly, and pushed with skopeo.

The pieces every image we write shares: canonical JSON, digests and descriptors, and a
layout directory (`oci-layout`, `index.json`, `blobs/sha256/`) assembled in a temp directory
beside its destination and renamed into place, so a layout on disk is always complete.
`publish` writes the release image of out/ with it; the lab writes its test images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

from captainos.core import cache
from captainos.core.errors import CaptainError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = 0  # mtime of every tar member and gzip header we write

Descriptor = dict[str, object]


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media: str, data: bytes) -> Descriptor:
    return {"mediaType": media, "digest": digest(data), "size": len(data)}


class HashingWriter:
    """A binary file that counts and hashes what is written to it (a layer streamed to disk)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.size, self.sha = handle, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:  # the file-object protocol tarfile writes through
        self.handle.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class Layout:
    """An OCI layout being written: `with Layout(dest) as layout: layout.blob(...); layout.finish(...)`.
    Nothing appears at dest until finish(); a failure leaves dest as it was."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        self.blobs = self.work / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)

    def blob(self, media: str, data: bytes) -> Descriptor:
        (self.blobs / digest(data).split(":", 1)[1]).write_bytes(data)
        return descriptor(media, data)

    def stream(self, media: str) -> _Stream:
        """A blob too large to hold in memory: `with layout.stream(media) as s: write to s.writer`;
        s.descriptor afterwards."""
        return _Stream(self, media)

    def finish(self, top: Descriptor, tag: str) -> str:
        """Write index.json naming top (a manifest or an image index) as tag; move into place."""
        (self.work / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                 "manifests": [{**top, "annotations": {REF_NAME: tag}}]}
        (self.work / "index.json").write_bytes(canonical_json(index))
        cache.remove(self.dest)
        self.work.rename(self.dest)
        return str(top["digest"])


class _Stream:
    def __init__(self, layout: Layout, media: str) -> None:
        self.layout, self.media = layout, media
        self.path = layout.blobs / f".incoming-{os.getpid()}"
        self.descriptor: Descriptor = {}

    def __enter__(self) -> _Stream:
        self._handle = self.path.open("wb")
        self.writer = HashingWriter(self._handle)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._handle.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)
            return
        os.replace(self.path, self.layout.blobs / self.writer.digest.split(":", 1)[1])
        self.descriptor = {"mediaType": self.media, "digest": self.writer.digest, "size": self.writer.size}


def check_reference(ref: str) -> tuple[str, str]:
    """(registry host, tag) of REGISTRY/REPO:TAG; one clear error for anything else."""
    host, slash, rest = ref.partition("/")
    repo, colon, tag = rest.rpartition(":")
    if "@" in ref:
        raise CaptainError(f"invalid image reference {ref!r}: a digest cannot be pushed to",
                           "name a tag: REGISTRY/REPO:TAG")
    if not slash or not ("." in host or ":" in host or host == "localhost") or not colon or not repo:
        raise CaptainError(f"invalid image reference {ref!r}",
                           "use REGISTRY/REPO:TAG with the registry's host, e.g. registry.example.com/captainos:v1")
    if not tag or len(tag) > 128 or not all(c.isalnum() or c in "_.-" for c in tag) or tag[0] in ".-":
        raise CaptainError(f"invalid tag {tag!r} in {ref!r}", "a tag is up to 128 of [A-Za-z0-9_.-], not "
                           "starting with . or -")
    return host, tag


def auth_env() -> dict[str, str]:
    """The variables that point skopeo at the operator's auth file (paths, not secrets): the
    credentials themselves never go on a command line."""
    return {k: os.environ[k] for k in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG") if k in os.environ}


def copy_argv(layout: Path, tag: str, dest_ref: str, *, cert_dir: Path | None = None, auth: Path | None = None,
              all_platforms: bool = False) -> list[str]:
    """skopeo copy from the OCI layout to a registry, digests kept. Without cert_dir and auth,
    skopeo uses the host's trust (/etc/containers/certs.d) and the usual auth files."""
    argv = ["skopeo", "copy", "--quiet", "--preserve-digests"]
    if all_platforms:
        argv.append("--all")
    if cert_dir is not None:
        argv += ["--dest-cert-dir", str(cert_dir), "--dest-tls-verify=true"]
    if auth is not None:
        argv += ["--dest-authfile", str(auth)]
    return [*argv, f"oci:{layout}:{tag}", f"docker://{dest_ref}"]
