"""Small OCI images written by our own code, byte for byte reproducible, pushed with skopeo.

Two kinds are needed by the end-to-end harness: the agent image (FROM scratch with one static
binary at /tink-agent, like the official one) and action images (Debian's static busybox with
its applets as symlinks). Both are an OCI image layout directory: `oci-layout`, `index.json`
and content-addressed blobs. Every tar member has a fixed owner and mtime, members are sorted
and gzip carries no name or time, so the same inputs always give the same digests.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages.oci import (
    EPOCH,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_TAR,
    MEDIA_MANIFEST,
    REF_NAME,
    Layout,
    canonical_json,
    copy_argv,
    descriptor,
    digest,
)

__all__ = ["MEDIA_INDEX", "MEDIA_MANIFEST", "REF_NAME", "Image", "Member", "push", "write_layout"]
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# Applets the action images expose as /bin/<name> (the scenarios use only these).
BUSYBOX_APPLETS = ("[", "cat", "cmp", "dd", "echo", "env", "false", "grep", "head", "hexdump", "id", "ls",
                   "od", "poweroff", "printf", "reboot", "sh", "sleep", "sync", "test", "true", "uname", "wc")


@dataclass(frozen=True)
class Member:
    """One layer member: a regular file (data), a directory, a symlink (target) or a hard link
    to an earlier member of the same layer (link)."""

    path: str  # relative, no leading slash
    mode: int = 0o755
    data: bytes | None = None
    target: str | None = None
    link: str | None = None

    @property
    def kind(self) -> bytes:
        if self.target is not None:
            return tarfile.SYMTYPE
        if self.link is not None:
            return tarfile.LNKTYPE
        return tarfile.REGTYPE if self.data is not None else tarfile.DIRTYPE


@dataclass(frozen=True)
class Image:
    """What an image holds; `layout()` writes it."""

    arch: Arch
    members: tuple[Member, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    labels: dict[str, str] = field(default_factory=dict)
    below: tuple[tuple[Member, ...], ...] = ()  # layers under `members`, the lowest first
    gzip: bool = True  # False: plain tar layers

    @property
    def layers(self) -> tuple[tuple[Member, ...], ...]:
        return (*self.below, self.members)

    @property
    def layer_media_type(self) -> str:
        return MEDIA_LAYER_GZIP if self.gzip else MEDIA_LAYER_TAR


def agent_image(binary: Path, arch: Arch, version: str) -> Image:
    """FROM scratch, /tink-agent, ENTRYPOINT ["/tink-agent"]: the shape of the official image."""
    return Image(arch=arch, members=(Member("tink-agent", 0o755, binary.read_bytes()),),
                 entrypoint=("/tink-agent",), labels={"org.opencontainers.image.version": version})


def busybox_image(arch: Arch, busybox: Path = BUSYBOX) -> Image:
    """An action image: /bin/busybox and its applets; the action's command is the whole argv."""
    if not arch.is_host() and busybox == BUSYBOX:
        raise CaptainError(f"the host busybox is not an {arch.value} binary",
                           "run the end-to-end harness on a host of the target architecture")
    if not busybox.is_file():
        raise CaptainError(f"{busybox} not found", "apt-get install busybox-static")
    members = [Member("bin", 0o755), Member("bin/busybox", 0o755, busybox.read_bytes()),
               Member("tmp", 0o1777)]
    members += [Member(f"bin/{name}", 0o777, target="busybox") for name in BUSYBOX_APPLETS]
    return Image(arch=arch, members=tuple(members), cmd=("/bin/sh",), env=("PATH=/bin",))


def layer_tar(members: Sequence[Member]) -> bytes:
    """An uncompressed, reproducible tar of the members (sorted, owner root, fixed mtime)."""
    seen: set[str] = set()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in sorted(members, key=lambda m: m.path):
            if member.path.startswith("/") or member.path in seen or not member.path:
                raise CaptainError(f"bad or duplicate layer path {member.path!r}")
            seen.add(member.path)
            info = tarfile.TarInfo(member.path)
            info.type = member.kind
            info.mode = member.mode
            info.mtime = EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if member.target is not None or member.link is not None:
                info.linkname = member.target if member.target is not None else str(member.link)
                tar.addfile(info)
            elif member.data is not None:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=6, mtime=EPOCH) as handle:
        handle.write(data)
    return buffer.getvalue()


def image_blobs(image: Image) -> tuple[list[bytes], bytes, bytes]:
    """(layers, lowest first; config; manifest) of the image."""
    tars = [layer_tar(members) for members in image.layers]
    layers = [gzip_bytes(tar) if image.gzip else tar for tar in tars]
    settings: dict[str, object] = {"Env": list(image.env)}
    if image.entrypoint:
        settings["Entrypoint"] = list(image.entrypoint)
    if image.cmd:
        settings["Cmd"] = list(image.cmd)
    if image.labels:
        settings["Labels"] = dict(image.labels)
    config: dict[str, object] = {
        "architecture": image.arch.go_arch(), "os": "linux", "config": settings,
        "rootfs": {"type": "layers", "diff_ids": [digest(tar) for tar in tars]},
        "history": [{"created_by": "captainos.oci", "comment": "written by CaptainOS"}],
    }
    if image.arch is Arch.ARM64:
        config["variant"] = "v8"
    config_blob = canonical_json(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                               "config": descriptor(MEDIA_CONFIG, config_blob),
                               "layers": [descriptor(image.layer_media_type, layer) for layer in layers]})
    return layers, config_blob, manifest


def write_layout(image: Image, dest: Path, tag: str) -> str:
    """Write an OCI image layout at dest (replacing it atomically); return the manifest digest."""
    layers, config_blob, manifest = image_blobs(image)
    with Layout(dest) as layout:
        for layer in layers:
            layout.blob(image.layer_media_type, layer)
        layout.blob(MEDIA_CONFIG, config_blob)
        return layout.finish(layout.blob(MEDIA_MANIFEST, manifest), tag)


@dataclass(frozen=True)
class Credentials:
    """Registry credentials; kept out of argv and logs (skopeo reads them from an auth file)."""

    username: str
    password: str = field(repr=False)


def auth_file_json(registry: str, creds: Credentials) -> str:
    """The containers-auth.json (docker config) document granting creds for registry."""
    import base64

    token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    return json.dumps({"auths": {registry: {"auth": token}}})


@contextmanager
def auth_file(registry: str, creds: Credentials | None) -> Iterator[Path | None]:
    """A private temp auth file for skopeo (mode 0600, deleted afterwards)."""
    if creds is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="captainos-auth-") as tmp:
        path = Path(tmp) / "auth.json"
        path.touch(mode=0o600)
        path.write_text(auth_file_json(registry, creds))
        yield path


def push(runner: Runner, layout: Path, tag: str, dest_ref: str, *, cert_dir: Path | None = None,
         creds: Credentials | None = None) -> None:
    registry = dest_ref.split("/", 1)[0]
    with auth_file(registry, creds) as auth:
        runner.run(copy_argv(layout, tag, dest_ref, cert_dir=cert_dir, auth=auth),
                   secret=(creds.password,) if creds else (), capture=True)
