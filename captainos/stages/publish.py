"""`./build.py publish`: out/ as a real OCI image, the way Tinkerbell's Helm chart mounts it.

The chart mounts the image as a Kubernetes image volume in its nginx pod and serves the files
at the image's root, so this is a runnable-format image (a config whose `rootfs.diff_ids`
match its layers), not an artifact. Each file of out/ is one uncompressed tar layer holding
it under every one of its names (the original name as a regular file, Smee's and the
versioned names as hard links to it): a layer is shared by every tag whose file is the same,
and nginx needs no symlinks. The artifacts are compressed already, so gzip would only cost time.

Every arch whose `sha256sums-<arch>.txt` is in out/ goes in, after the sums are checked. The
image is always an index with a linux/amd64 and a linux/arm64 manifest, both listing every
layer: the files are data, not programs, and the node that mounts them may be of either
architecture whatever the machines it serves are (containerd does not unpack the layers of
an image whose only platform is not the node's). Members carry no time, owner or order
that depends on the machine: the same out/ gives the same digests.
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from captainos import __version__
from captainos.core import log
from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import artifacts, oci, sign

TITLE = "CaptainOS"


@dataclass(frozen=True)
class File:
    """One file of out/ and every name it has there (names[0] is the regular file)."""

    path: Path
    names: tuple[str, ...]


def named(out_dir: Path, target: str) -> File:
    """A file of out/ with the links to it."""
    return File(out_dir / target, (target, *artifacts.links_to(out_dir, target)))


def files(out_dir: Path, arch: Arch) -> list[File]:
    """The checked files of one arch: each artifact with its links, and the sums file (never a
    signature left in out/ from before: only the one this run makes, see run())."""
    artifacts.verify_checksums(out_dir, arch)
    artifacts.release_of(out_dir, arch)  # refuses an out/ whose artifacts come from two kernels
    sums = artifacts.checksums_name(arch)
    listed = {line.partition("  ")[2] for line in (out_dir / sums).read_text().splitlines()}
    if missing := sorted(set(artifacts.checksum_names(out_dir, arch)) - listed):
        raise CaptainError(f"{sums} does not list {', '.join(missing)}",
                           f"rewrite it: './build.py checksums' (ARCH={arch.value})")
    return [named(out_dir, target) for target in [*artifacts.checksum_targets(out_dir, arch), sums]]


def built_arches(out_dir: Path) -> list[Arch]:
    arches = [arch for arch in Arch if (out_dir / artifacts.checksums_name(arch)).is_file()]
    if not arches:
        raise CaptainError(f"nothing to publish: {out_dir} has no sha256sums-<arch>.txt",
                           "build first ('./build.py'), which writes the sums")
    return arches


def _layer(layout: oci.Layout, file: File) -> oci.Descriptor:
    """A tar of file under each of its names: one regular file, the others hard links to it."""
    with layout.stream(oci.MEDIA_LAYER_TAR) as stream, \
            tarfile.open(fileobj=stream.writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        info = tarfile.TarInfo(file.names[0])
        info.size, info.mode, info.mtime = file.path.stat().st_size, 0o644, oci.EPOCH
        with file.path.open("rb") as data:
            tar.addfile(info, data)
        for name in file.names[1:]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname, link.mode, link.mtime = tarfile.LNKTYPE, file.names[0], 0o644, oci.EPOCH
            tar.addfile(link)
    return stream.descriptor


def collect(out_dir: Path) -> tuple[list[Arch], list[File]]:
    """The arches in out/ and their checked files: every refusal happens here."""
    arches = built_arches(out_dir)
    return arches, [f for arch in arches for f in files(out_dir, arch)]


def write(out_dir: Path, dest: Path, tag: str) -> str:
    """Write the image of out/ as an OCI layout at dest (tag names it); return its digest."""
    return write_layout(out_dir, *collect(out_dir), dest, tag)


def write_layout(out_dir: Path, arches: list[Arch], found: list[File], dest: Path, tag: str) -> str:
    """The layout of these (checked) files; labels name each arch's kernel release."""
    everything = sorted(found, key=lambda f: f.names[0])
    log.info(f"==> publish: {len(everything)} files of {', '.join(a.value for a in arches)} -> {dest}:{tag}")
    with oci.Layout(dest) as layout:
        layers = [_layer(layout, f) for f in everything]
        labels = {"org.opencontainers.image.title": TITLE, "org.opencontainers.image.version": __version__}
        for arch in arches:
            if release := artifacts.release_of(out_dir, arch):
                labels[f"io.captainos.kernel-release.{arch.value}"] = release
        manifests = []
        for arch in Arch:  # every platform, whichever arches' files are inside (see the docstring)
            platform = {"architecture": arch.go_arch(), "os": "linux",
                        **({"variant": "v8"} if arch is Arch.ARM64 else {})}
            config = layout.blob(oci.MEDIA_CONFIG, oci.canonical_json({
                **platform, "config": {"Labels": labels},
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}))
            manifest = layout.blob(oci.MEDIA_MANIFEST, oci.canonical_json({
                "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST, "config": config, "layers": layers,
                "annotations": {"org.opencontainers.image.title": TITLE,
                                "org.opencontainers.image.version": __version__}}))
            manifests.append({**manifest, "platform": platform})
        top = layout.blob(oci.MEDIA_INDEX, oci.canonical_json(
            {"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": manifests}))
        digest = layout.finish(top, tag)
    log.info(f"    {dest}: {digest}")
    return digest


def check_oci_dir(oci_dir: Path, out_dir: Path) -> None:
    """--oci-dir is replaced whole: only a new path or an OCI layout, never out/ or around it."""
    target, out = oci_dir.resolve(), out_dir.resolve()
    if target == out or target in out.parents or out in target.parents:
        raise CaptainError(f"--oci-dir {oci_dir} would replace or hold {out_dir}", "give a directory of its own")
    if target.exists() and not (target / "oci-layout").is_file():
        raise CaptainError(f"--oci-dir {oci_dir} exists and is not an OCI layout; it would be replaced",
                           "give a new path, or an OCI layout written before")


def run(cfg: Config, oci_dir: Path | None, to: str | None, sign_key: Path | None = None) -> str:
    """The verb: sign the sums (with a key), write the layout (kept at oci_dir, or a temp one),
    push it and sign what was pushed, each step only after the one before succeeded."""
    if oci_dir is None and to is None:
        raise CaptainError("publish needs somewhere to put the image",
                           "give --oci-dir DIR (a local OCI layout) and/or --to REGISTRY/REPO:TAG")
    tag = oci.check_reference(to)[1] if to else __version__
    if oci_dir is not None:
        check_oci_dir(oci_dir, cfg.out_dir)
    arches, found = collect(cfg.out_dir)  # every refusal before anything is signed, written or pushed
    cosign = None
    if sign_key is not None:
        sign.check_key(sign_key)
        cosign = sign.build(cfg, Runner())
        log.info("==> publish: signing the sums")
        sign.sign_blobs(cosign, sign_key, [cfg.out_dir / artifacts.checksums_name(arch) for arch in arches])
        for arch in arches:
            if release := artifacts.release_of(cfg.out_dir, arch):
                artifacts.link_versioned(cfg.out_dir, arch, artifacts.signature_name(arch), release)
        found += [named(cfg.out_dir, artifacts.signature_name(arch)) for arch in arches]
    with tempfile.TemporaryDirectory(prefix="captainos-publish-") as tmp:
        layout = oci_dir or Path(tmp) / "layout"
        digest = write_layout(cfg.out_dir, arches, found, layout, tag)
        if to:
            push(layout, tag, to)
            if cosign is not None and sign_key is not None:
                sign.sign_image(cosign, sign_key, f"{to.rsplit(':', 1)[0]}@{digest}")
    return digest


def push(layout: Path, tag: str, to: str) -> None:
    """skopeo copy, every platform, digests kept. Credentials come from the usual auth files
    (REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json, ~/.docker/config.json), trust
    from /etc/containers/certs.d: nothing secret is ever on the command line."""
    log.info(f"==> publish: pushing to {to}")
    Runner().run(oci.copy_argv(layout, tag, to, all_platforms=True), env=oci.auth_env(), capture=True)
    log.info(f"    pushed {to}")
