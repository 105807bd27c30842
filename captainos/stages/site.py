"""What a site adds to the image after mkosi: embedded container images and SSH keys.

Both go into one more zstd CPIO segment appended to the mkosi image (segments.py), so a
change to either rebuilds only this segment, never the OS:

- `--embed-images FILE`: the images are pulled with skopeo at build time (the build host's
  containers trust and auth file apply: /etc/containers/certs.d, REGISTRY_AUTH_FILE), for
  the target architecture only, into one OCI layout (layers shared between images are stored
  once), each manifest annotated with the fully qualified name a workflow uses. The layout is
  archived as `/usr/share/captainos/embedded/images.tar`; at boot `import-images` loads it
  into containerd's namespace `tinkerbell` before the agent starts, then deletes it.
- `--ssh-authorized-keys FILE`: the keys, checked here, as
  `/usr/lib/captainos/ssh/authorized_keys`; the `ssh` mkosi profile brings the server.

The list file: one image a line, `SOURCE [TARGET]`, `#` starts a comment. SOURCE is pulled;
TARGET (default: SOURCE) is the name the image gets on the machine, normalized as docker
does (`alpine:3` -> `docker.io/library/alpine:3`), because the agent looks images up by
their fully qualified names.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captainos.core import cache, log, pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import cpio, oci, segments

SEGMENT = "site.cpio.zst"
EMBED_DIR = Path("usr/share/captainos/embedded")
EMBED_ARCHIVE = EMBED_DIR / "images.tar"
EMBED_LIST = EMBED_DIR / "images.list"  # TARGET DIGEST per line, read by import-images
SSH_KEYS = Path("usr/lib/captainos/ssh/authorized_keys")
SSH_PROFILE = "ssh"
IMAGE_NAME = "io.containerd.image.name"  # the name containerd's import gives a manifest
REF_NAME = oci.REF_NAME
HUB = "docker.io"
CPIO_MAX_FILE = 1 << 32  # newc stores a file's size in 8 hex digits

# The distribution reference grammar (github.com/distribution/reference), as regexes.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*" \
          r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
                        r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$")
# Public key types an OpenSSH or dropbear server accepts in authorized_keys.
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")


@dataclass(frozen=True)
class Embed:
    source: str  # pulled at build time
    target: str  # fully qualified name on the machine


def normalize(ref: str) -> str:
    """The fully qualified form of an image reference, as docker and containerd resolve it;
    raises CaptainError for something that is not a reference."""
    found = _REFERENCE.match(ref)
    if not found or len(ref) > 255 + 128:
        raise CaptainError(f"not an image reference: {ref!r}", "use [registry[:port]/]path[:tag][@sha256:digest]")
    domain, path, tag, digest = found.group("domain", "path", "tag", "digest")
    # A first component without "." or ":" (and not localhost) is a Docker Hub path.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost" or
                                   domain.startswith("[")):
        domain, path = None, f"{domain}/{path}"
    if domain in (None, "index.docker.io"):
        domain = HUB
    if domain == HUB and "/" not in path:
        path = f"library/{path}"
    name = f"{domain}/{path}"
    if digest:
        return f"{name}:{tag}@{digest}" if tag else f"{name}@{digest}"
    return f"{name}:{tag or 'latest'}"


def parse_embed_list(path: Path) -> list[Embed]:
    """The list file's images; one line naming the file and line for anything wrong."""
    if not path.is_file():
        raise CaptainError(f"embedded image list {path} does not exist", "--embed-images names a file")
    found: list[Embed] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}"
        if len(words) > 2:
            raise CaptainError(f"{where}: expected 'SOURCE [TARGET]', got {len(words)} words", raw.strip())
        try:
            source, target = normalize(words[0]), normalize(words[-1])
        except CaptainError as exc:
            raise CaptainError(f"{where}: {exc.message}", exc.hint) from None
        if "@" in source and ":" in source.split("@")[0].rsplit("/", 1)[-1]:
            raise CaptainError(f"{where}: {words[0]} has both a tag and a digest", "skopeo pulls by one of them: "
                               "keep the digest, and give the tag in TARGET")
        if target in seen:
            raise CaptainError(f"{where}: {target} is already embedded by line {seen[target]}",
                               "each target name once")
        seen[target] = number
        found.append(Embed(source, target))
    if not found:
        raise CaptainError(f"embedded image list {path} names no image", "one image reference a line")
    return found


def parse_authorized_keys(path: Path) -> list[str]:
    """The public key lines of an authorized_keys file (options allowed before the key);
    one line naming the file and line for anything that is not a public key."""
    if not path.is_file():
        raise CaptainError(f"authorized keys file {path} does not exist", "--ssh-authorized-keys names a file")
    keys = []
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not key_line_ok(line):
            raise CaptainError(f"{path}:{number}: not an SSH public key",
                               f"expected '[options] TYPE BASE64 [comment]' with TYPE one of {', '.join(KEY_TYPES)}"
                               " (a private key never goes here)")
        keys.append(line)
    if not keys:
        raise CaptainError(f"authorized keys file {path} holds no key", "one public key a line (id_ed25519.pub)")
    return keys


def key_line_ok(line: str) -> bool:
    """A key TYPE followed by base64 whose embedded name is TYPE (what sshd checks first)."""
    words = line.split()
    for index, word in enumerate(words[:-1]):
        if word in KEY_TYPES:
            try:
                blob = base64.b64decode(words[index + 1], validate=True)
            except ValueError:
                return False
            size = int.from_bytes(blob[:4], "big")
            return len(blob) > 4 + size and blob[4:4 + size] == word.encode()
    return False


def check(cfg: Config) -> None:
    """Bad list or key files fail before any work (build() reads them again)."""
    if cfg.embed_images is not None:
        parse_embed_list(cfg.embed_images)
    if cfg.ssh_authorized_keys is not None:
        parse_authorized_keys(cfg.ssh_authorized_keys)


def wanted(cfg: Config) -> bool:
    return cfg.embed_images is not None or cfg.ssh_authorized_keys is not None


def profiles(cfg: Config) -> tuple[str, ...]:
    """The mkosi profiles of this build: SSH keys bring the SSH server's profile."""
    if cfg.ssh_authorized_keys is not None and SSH_PROFILE not in cfg.profiles:
        return (*cfg.profiles, SSH_PROFILE)
    return cfg.profiles


# --- pulling --------------------------------------------------------------------------------------

def inspect_argv(source: str) -> list[str]:
    return ["skopeo", "inspect", "--raw", "--retry-times", "2", f"docker://{source}"]


def copy_argv(cfg: Config, source: str, layout: Path, tag: str) -> list[str]:
    """Pull one platform of source into the shared layout under a temporary tag."""
    argv = ["skopeo", "copy", "--quiet", "--retry-times", "2", "--override-os", "linux",
            "--override-arch", cfg.arch.go_arch()]
    return [*argv, f"docker://{source}", f"oci:{layout}:{tag}"]


def by_digest(source: str, digest: str) -> str:
    """source named by the manifest digest read for the cache key instead of its tag: a tag that
    moves between that read and the copy must not put other content under the key."""
    if "@" in source:
        return source
    head, slash, last = source.rpartition("/")
    return f"{head}{slash}{last.split(':', 1)[0]}@{digest}"


def source_digests(runner: Runner, embeds: Sequence[Embed]) -> list[str]:
    """sha256 of each source's manifest (or index) as the registry serves it now: a changed tag
    gives a new key, an unchanged one a cache hit without pulling anything."""
    digests = []
    for item in embeds:
        raw = runner.run(inspect_argv(item.source), capture=True, env=oci.auth_env(), check=False)
        if raw.returncode != 0:
            raise CaptainError(f"cannot read the embedded image {item.source} from its registry",
                               "the registry must be reachable at build time; trust and auth come from "
                               "/etc/containers/certs.d and REGISTRY_AUTH_FILE")
        digests.append("sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest())
    return digests


def check_architecture(layout: Path, descriptor: dict[str, Any], item: Embed, arch: str) -> None:
    """The pulled manifest's config is for arch: skopeo takes a single-platform image of any
    architecture, and the machine would refuse it only at boot."""
    def blob(digest: str) -> dict[str, Any]:
        return dict(json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text()))

    found = blob(blob(descriptor["digest"])["config"]["digest"]).get("architecture", "?")
    if found != arch:
        raise CaptainError(f"the embedded image {item.source} is for {found}, not {arch}",
                           "embed an image (or an index) that has this architecture")


def name_manifests(layout: Path, embeds: Sequence[Embed], arch: str) -> list[tuple[str, str]]:
    """Give each manifest of the layout its target name (replacing the temporary tags), in list
    order, each checked for arch; return (target, manifest digest) pairs."""
    index = json.loads((layout / "index.json").read_text())
    by_tag = {m.get("annotations", {}).get(REF_NAME): m for m in index["manifests"]}
    manifests, named = [], []
    for number, item in enumerate(embeds):
        descriptor = dict(by_tag[f"embed{number}"])
        check_architecture(layout, descriptor, item, arch)
        descriptor["annotations"] = {IMAGE_NAME: item.target, REF_NAME: item.target}
        manifests.append(descriptor)
        named.append((item.target, descriptor["digest"]))
    index["manifests"] = manifests
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
    return named


def tar_layout(layout: Path) -> bytes:
    """The layout as a tar with fixed owners and times, members sorted: same layout, same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            info = tarfile.TarInfo(str(path.relative_to(layout)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = pins.SOURCE_DATE_EPOCH, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with path.open("rb") as data:
                    tar.addfile(info, data)
    return buffer.getvalue()


def stage_embedded(cfg: Config, runner: Runner, embeds: Sequence[Embed], digests: Sequence[str], tree: Path,
                   work: Path) -> list[dict[str, str]]:
    """Copy each image by the digest source_digests read (the one in the cache key)."""
    layout = work / "layout"
    for number, (item, digest) in enumerate(zip(embeds, digests, strict=True)):
        log.info(f"    embedding {item.source} ({digest[:19]}) as {item.target}")
        runner.run(copy_argv(cfg, by_digest(item.source, digest), layout, f"embed{number}"), env=oci.auth_env(),
                   capture=True)
    named = name_manifests(layout, embeds, cfg.arch.go_arch())
    total = sum(p.stat().st_size for p in layout.rglob("*") if p.is_file())
    if total >= CPIO_MAX_FILE:
        raise CaptainError(f"the embedded images take {total:,} bytes; one initramfs file holds less than 4 GiB",
                           "embed fewer or smaller images")
    cache.atomic_write(tree / EMBED_ARCHIVE, tar_layout(layout))
    shutil.rmtree(layout)
    cache.atomic_write(tree / EMBED_LIST, "".join(f"{target} {digest}\n" for target, digest in named))
    return [{"source": item.source, "target": target, "manifest": digest}
            for item, (target, digest) in zip(embeds, named, strict=True)]


# --- the segment and the image with it ----------------------------------------------------------

def build(cfg: Config, runner: Runner, base_entry: Path) -> Path:
    """The image entry: the mkosi image of base_entry with this site's segment after it."""
    embeds = parse_embed_list(cfg.embed_images) if cfg.embed_images is not None else []
    keys = parse_authorized_keys(cfg.ssh_authorized_keys) if cfg.ssh_authorized_keys is not None else []
    # skopeo runs on this host in every stage mode: the trust and auth it reads are the host's.
    host = Runner()
    digests = source_digests(host, embeds)
    parts = {"base": base_entry.name, "arch": cfg.arch.value,
             "embed": [[e.source, e.target, d] for e, d in zip(embeds, digests, strict=True)],
             "ssh_keys": hashlib.sha256("\n".join(keys).encode()).hexdigest() if keys else None,
             "mtime": pins.SOURCE_DATE_EPOCH,
             "code": cache.code_digest(__file__, cpio.__file__, segments.__file__)}

    def produce(work: Path) -> None:
        tree = work / "tree"
        record: dict[str, Any] = {"embedded_images": [], "ssh_keys": len(keys)}
        if embeds:
            record["embedded_images"] = stage_embedded(cfg, host, embeds, digests, tree, work)
        if keys:
            cache.atomic_write(tree / SSH_KEYS, "".join(f"{key}\n" for key in keys))
        raw = work / "site.cpio"
        with raw.open("wb") as out:
            cpio.write_tree(tree, out, mtime=pins.SOURCE_DATE_EPOCH)
        shutil.rmtree(tree)
        segments.compress(runner, segments.OS_ZSTD, raw, work / SEGMENT)
        base = base_entry / "initramfs.cpio.zst"
        segments.concatenate([base, work / SEGMENT], work / "initramfs.cpio.zst")
        # The base image's SBOM (what the site segment adds is in image.json's "site").
        for name in ("sbom.spdx.json", "packages.lock"):
            shutil.copy2(base_entry / name, work / name)
        image = json.loads((base_entry / "image.json").read_text())
        image["segments"]["site"] = (work / SEGMENT).stat().st_size
        image["size"] = (work / "initramfs.cpio.zst").stat().st_size
        image["site"] = record
        (work / SEGMENT).unlink()
        cache.atomic_write(work / "image.json", json.dumps(image, indent=1, sort_keys=True) + "\n")
        log.info(f"    site segment: {log.human_bytes(image['segments']['site'])} "
                 f"({len(embeds)} embedded images, {len(keys)} SSH keys)")

    return cache.cached(cfg.cache_dir, "initramfs", cfg.arch.value, parts, force=cfg.force("initramfs"),
                        produce=produce)
