"""Tinkerbell's hub actions (github.com/tinkerbell/actions) as operators run them, and the disk
image their canonical template installs.

The actions are built from source at the pinned commit (pins.HUB_ACTIONS), one static binary
each, into OCI images shaped like the published ones (FROM scratch, /usr/bin/<action> as the
entrypoint, a CA bundle at /etc/ssl/certs/ca-certificates.crt: here the lab's CA). The Go
module proxy does not serve that repository, so its source comes from a git repository the
operator names (--hub-actions-src, CAPTAINOS_HUB_ACTIONS) that holds the commit; the commit
names the tree, go.sum (checked against its pinned sha256) every dependency, and those come
from the proxy, checked against the checksum database.

The disk image is what image2disk streams in the lab: GPT, one ext4 partition holding an
installed OS of its own (the lab's kernel and a busybox initramfs whose /init prints what
writefile and cexec left on the disk, then powers the machine off), so that a kexec by the
hub's kexec action is seen to boot the installed system.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import posixpath
import shutil
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import oci
from captainos.sources import fetch, golang
from captainos.stages import cpio, tools
from captainos.stages import oci as oci_layout

REPO_PATH = "tinkerbell/actions"  # in the lab registry: <registry>/tinkerbell/actions/<action>:latest
TAG = "latest"
# What the installed OS's /init prints; the lab test reads these lines on the console.
MARK = "installed-os:"
INSTALLED_FILES = "etc/captainos-hub"  # where the canonical template's writefile and cexec write
# Modules the installed OS loads to read its ext4 root on a virtio disk (with what they need;
# ext4 asks the crypto API for crc32c at every mount, which no symbol dependency names).
INSTALLED_MODULES = ("virtio_blk", "crc32c_generic", "ext4")
INSTALLED_APPLETS = ("sh", "cat", "echo", "id", "insmod", "mount", "mkdir", "poweroff", "sleep", "sync", "uname")
DISK_SIZE_MIB = 64
# The same disk image as an OCI artifact for oci2disk, the way `oras push` makes one: an empty
# config of an unknown type, the file as a plain-tar-typed layer named by its title. oci2disk
# picks the decompressor by the reference's extension, so the tag ends in .gz.
DISK_REPO, DISK_TAG = "captainos/hub-disk", "raw.gz"
ARTIFACT_CONFIG = "application/vnd.unknown.config.v1+json"
TITLE = "org.opencontainers.image.title"
PART_START_MIB = 1


def _source(cfg: Config, runner: Runner, dest: Path) -> None:
    """The pinned commit's tree in dest (fresh), with its go.sum checked."""
    pin = pins.HUB_ACTIONS
    repo = cfg.hub_actions_src
    if repo is None:
        raise CaptainError(f"the hub actions are built from the source of {pin.repository}, and none was given",
                           f"give a git repository holding commit {pin.commit[:12]} with --hub-actions-src DIR "
                           "(CAPTAINOS_HUB_ACTIONS)")
    check = runner.run(["git", "-C", str(repo), "cat-file", "-e", f"{pin.commit}^{{commit}}"], check=False,
                       capture=True)
    if check.returncode != 0:
        raise CaptainError(f"{repo} does not hold commit {pin.commit[:12]} of {pin.repository}",
                           "fetch that commit into it, or give another repository")
    archive = dest.parent / "source.tar"
    runner.run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), pin.commit])
    fetch.safe_extract(archive, dest)
    archive.unlink()
    found = cache.sha256_file(dest / "go.sum") if (dest / "go.sum").is_file() else "none"
    if found != pin.go_sum_sha256:
        raise CaptainError(f"go.sum of {pin.repository}@{pin.commit[:12]} has sha256 {found}, "
                           f"not the pinned {pin.go_sum_sha256}", "nothing was built")


def action_image(arch: Arch, name: str, binary: bytes, ca_pem: bytes) -> oci.Image:
    """An action image the way the hub publishes it: FROM scratch, one binary, a CA bundle."""
    members = (oci.Member("usr", 0o755), oci.Member("usr/bin", 0o755), oci.Member(f"usr/bin/{name}", 0o755, binary),
               oci.Member("etc", 0o755), oci.Member("etc/ssl", 0o755), oci.Member("etc/ssl/certs", 0o755),
               oci.Member("etc/ssl/certs/ca-certificates.crt", 0o644, ca_pem))
    return oci.Image(arch=arch, members=members, entrypoint=(f"/usr/bin/{name}",),
                     labels={"org.opencontainers.image.source": f"https://{pins.HUB_ACTIONS.repository}",
                             "org.opencontainers.image.revision": pins.HUB_ACTIONS.commit})


def images(cfg: Config, runner: Runner, ca_cert: Path) -> Path | None:
    """Cache entry with one OCI layout per hub action (`<action>/`, tag TAG) and actions.json;
    None when it is not cached and no source was given."""
    pin = pins.HUB_ACTIONS
    go_version = golang.go_version(runner, cfg.cache_dir, cfg.arch)
    parts = {"code": cache.code_digest(__file__, oci.__file__), "repository": pin.repository, "commit": pin.commit,
             "go_sum": pin.go_sum_sha256, "programs": list(pin.programs), "go": go_version, "arch": cfg.arch.value,
             "ca": cache.sha256_file(ca_cert)}

    def produce(work: Path) -> None:
        src = work / "src"
        _source(cfg, runner, src)
        env = {**golang.go_env(cfg.cache_dir, cfg.arch), "GOFLAGS": "-mod=readonly"}
        built: dict[str, dict[str, object]] = {}
        for name in pin.programs:
            output = work / "bin" / name
            with log.stage(f"hub {name}", f"{pin.repository}@{pin.commit[:12]} ./{name} for {cfg.arch.value}"):
                runner.run([golang.go_binary(), "build", "-p", tools.GO_JOBS, "-trimpath", "-ldflags=-s -w",
                            "-o", str(output), f"./{name}"], env=env, cwd=src, log_file=work / f"{name}.log")
            if tools.elf_machine(output) != cfg.arch.elf_machine() or not tools.is_static(output):
                raise CaptainError(f"hub action {name} was not built as a static {cfg.arch.value} binary")
            image = action_image(cfg.arch, name, output.read_bytes(), ca_cert.read_bytes())
            built[name] = {"size": output.stat().st_size, "manifest": oci.write_layout(image, work / name, TAG)}
        shutil.rmtree(src)
        shutil.rmtree(work / "bin")
        (work / "actions.json").write_text(json.dumps({**parts, "actions": built}, indent=1, sort_keys=True) + "\n")

    if cfg.hub_actions_src is None and not cache.entry(cfg.cache_dir, "hub-actions", cfg.arch.value, parts).done():
        return None
    return cache.cached(cfg.cache_dir, "hub-actions", cfg.arch.value, parts, force=False, produce=produce)


def push(runner: Runner, images_entry: Path, disk_entry: Path, registry: str, cert_dir: Path) -> None:
    """The hub actions and the disk image's artifact into the lab registry."""
    for name in pins.HUB_ACTIONS.programs:
        oci.push(runner, images_entry / name, TAG, f"{registry}/{REPO_PATH}/{name}:{TAG}", cert_dir=cert_dir)
    oci.push(runner, disk_entry / "oci", DISK_TAG, f"{registry}/{DISK_REPO}:{DISK_TAG}", cert_dir=cert_dir)


# --- the installed OS of the canonical template ---------------------------------------------

def _modules(initramfs: bytes, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(file name, uncompressed .ko) of the wanted modules and everything they depend on, in the
    order to load them, from the image's own module tree (modules built in need nothing)."""
    files = {m.name: m.data for m in cpio.members(initramfs) if m.is_file}
    deps_name = next((n for n in files if n.endswith("/modules.dep") and "/lib/modules/" in n), None)
    if deps_name is None:
        raise CaptainError("the initramfs has no modules.dep", "build the image with its kernel modules")
    base = posixpath.dirname(deps_name)
    deps: dict[str, list[str]] = {}
    for line in files[deps_name].decode().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()

    def short(path: str) -> str:
        return posixpath.basename(path).split(".ko")[0].replace("-", "_")

    by_name = {short(path): path for path in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for need in deps.get(path, []):
            visit(need)
        if path not in order:
            order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    loaded = []
    for path in order:
        data = files[f"{base}/{path}"]
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.endswith(".zst"):
            data = cpio.decompress_data(data, path)
        loaded.append((short(path) + ".ko", data))
    return loaded


def _init_script(modules: list[str]) -> bytes:
    loads = "".join(f"insmod /lib/modules/{name}\n" for name in modules)
    return f"""#!/bin/sh
# The installed OS of the lab's hub template: show what the workflow left on the disk.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{loads}i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o ro /dev/vda1 /mnt
echo "{MARK} booted $(uname -r)"
echo "{MARK} writefile: $(cat /mnt/{INSTALLED_FILES}/writefile)"
echo "{MARK} cexec: $(cat /mnt/{INSTALLED_FILES}/cexec)"
sync
poweroff -f
""".encode()


def _busybox_entries(busybox: Path, prefix: str = "bin") -> list[cpio.Entry]:
    return [(f"{prefix}/busybox", 0o100755, busybox.read_bytes()),
            *((f"{prefix}/{applet}", 0o120777, b"busybox") for applet in INSTALLED_APPLETS)]


def installed_initrd(initramfs: Path, busybox: Path) -> bytes:
    """The installed OS's initramfs: busybox, the disk and ext4 modules, our /init."""
    modules = _modules(cpio.decompress(initramfs), INSTALLED_MODULES)
    entries: list[cpio.Entry] = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "lib",
                                                               "lib/modules")]
    entries += _busybox_entries(busybox)
    entries += [(f"lib/modules/{name}", 0o100644, data) for name, data in modules]
    entries.append(("init", 0o100755, _init_script([name for name, _ in modules])))
    return cpio.write(entries)


def write_artifact(data: bytes, title: str, dest: Path) -> str:
    """An OCI layout at dest holding data as a one-file artifact, tagged DISK_TAG."""
    with oci_layout.Layout(dest) as layout:
        layer = {**layout.blob(oci_layout.MEDIA_LAYER_TAR, data), "annotations": {TITLE: title}}
        config = layout.blob(ARTIFACT_CONFIG, b"{}")
        manifest = oci_layout.canonical_json({"schemaVersion": 2, "mediaType": oci_layout.MEDIA_MANIFEST,
                                              "config": config, "layers": [layer]})
        return layout.finish(layout.blob(oci_layout.MEDIA_MANIFEST, manifest), DISK_TAG)


def disk_image(cfg: Config, runner: Runner, kernel: Path, initramfs: Path, busybox: Path) -> Path:
    """Cache entry with disk.img.gz: GPT, partition 1 ext4 (label `installed`) holding /boot/vmlinuz,
    /boot/initrd, a busybox root for cexec and an empty /etc/captainos-hub; and oci/, the same
    file as an OCI artifact (tag DISK_TAG) for oci2disk."""
    parts = {"code": cache.code_digest(__file__), "kernel": cache.sha256_file(kernel),
             "initramfs": cache.sha256_file(initramfs), "busybox": cache.sha256_file(busybox),
             "size_mib": DISK_SIZE_MIB}

    def produce(work: Path) -> None:
        root = work / "root"
        for d in ("boot", "bin", "dev", "proc", "sys", "tmp", INSTALLED_FILES):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, root / "boot" / "vmlinuz")
        (root / "boot" / "initrd").write_bytes(installed_initrd(initramfs, busybox))
        shutil.copyfile(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        for applet in INSTALLED_APPLETS:
            os.symlink("busybox", root / "bin" / applet)
        part_mib = DISK_SIZE_MIB - 2 * PART_START_MIB
        part = work / "part.img"
        runner.run(["mkfs.ext4", "-q", "-F", "-L", "installed", "-E", "root_owner=0:0",
                    "-d", str(root), str(part), f"{part_mib}M"], capture=True)
        disk = work / "disk.img"
        with disk.open("wb") as handle:
            handle.truncate(DISK_SIZE_MIB << 20)
        table = f"label: gpt\nstart={PART_START_MIB << 11}, size={part_mib << 11}, type=L, name=installed\n"
        runner.run(["sfdisk", "--quiet", str(disk)], input_text=table, capture=True)
        with disk.open("r+b") as out, part.open("rb") as data:
            out.seek(PART_START_MIB << 20)
            shutil.copyfileobj(data, out)
        with disk.open("rb") as raw, gzip.GzipFile(work / "disk.img.gz", "wb", compresslevel=6, mtime=0) as packed:
            shutil.copyfileobj(raw, packed)
        write_artifact((work / "disk.img.gz").read_bytes(), "disk.img.gz", work / "oci")
        for path in (part, disk):
            path.unlink()
        shutil.rmtree(root)

    return cache.cached(cfg.cache_dir, "hub-disk", cfg.arch.value, parts, force=False, produce=produce)
