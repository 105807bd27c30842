"""The hub template's pieces that run on the build host: the action images from a source
repository, the installed OS's initramfs and disk image, the artifact server's /hub/ files."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from captainos.core import config, pins
from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import hub, oci
from captainos.lab.registry import free_port
from captainos.stages import cpio

BUSYBOX = Path("/bin/busybox")


def cfg_for(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    return config.load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), **env})


def fake_initramfs(tmp_path: Path, compress: str = "xz") -> Path:
    """An image's module tree as the kernel stage leaves it: modules.dep and xz'd modules."""
    base = "usr/lib/modules/6.12.0"
    dep = ("kernel/fs/ext4/ext4.ko.xz: kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz kernel/lib/crc16.ko.xz\n"
           "kernel/fs/jbd2/jbd2.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/lib/crc16.ko.xz:\n"
           "kernel/drivers/block/virtio_blk.ko.xz:\nkernel/crypto/crc32c_generic.ko.xz:\nkernel/sound/snd.ko.xz:\n")
    entries: list[cpio.Entry] = [(f"{base}/modules.dep", 0o100644, dep.encode())]
    for line in dep.splitlines():
        path = line.split(":")[0]
        entries.append((f"{base}/{path}", 0o100644, lzma.compress(f"module {path}".encode())))
    out = tmp_path / "initramfs.cpio"
    out.write_bytes(cpio.write(entries))
    return out


def test_modules_come_with_what_they_need_in_load_order(tmp_path):
    modules = hub._modules(fake_initramfs(tmp_path).read_bytes(), hub.INSTALLED_MODULES)
    names = [name for name, _ in modules]
    assert names == ["virtio_blk.ko", "crc32c_generic.ko", "mbcache.ko", "jbd2.ko", "crc16.ko", "ext4.ko"]
    assert dict(modules)["ext4.ko"] == b"module kernel/fs/ext4/ext4.ko.xz"  # decompressed


def test_an_image_without_modules_is_one_error(tmp_path):
    raw = tmp_path / "bare.cpio"
    raw.write_bytes(cpio.write([("etc", 0o40755, b"")]))
    with pytest.raises(CaptainError, match=r"has no modules\.dep"):
        hub.installed_initrd(raw, BUSYBOX)


@pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs Debian's busybox-static")
def test_the_installed_initrd_loads_its_modules_then_shows_the_files(tmp_path):
    archive = {m.name: m for m in cpio.members(hub.installed_initrd(fake_initramfs(tmp_path), BUSYBOX))}
    init = archive["init"].data.decode()
    assert archive["init"].mode == 0o100755
    loads = [line.split()[1] for line in init.splitlines() if line.startswith("insmod")]
    assert loads == [f"/lib/modules/{n}" for n in ("virtio_blk.ko", "crc32c_generic.ko", "mbcache.ko", "jbd2.ko",
                                                    "crc16.ko", "ext4.ko")]
    assert all(path.lstrip("/") in archive for path in loads)
    assert f"cat /mnt/{hub.INSTALLED_FILES}/writefile" in init and "poweroff -f" in init
    assert archive["bin/sh"].data == b"busybox" and archive["bin/sh"].mode == 0o120777
    # The script is valid shell.
    script = tmp_path / "init"
    script.write_bytes(archive["init"].data)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0


@pytest.mark.skipif(not BUSYBOX.is_file() or shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                    reason="needs busybox-static and e2fsprogs")
def test_the_disk_image_is_gpt_with_the_installed_os_on_ext4(tmp_path):
    cfg = cfg_for(tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"a kernel" * 1000)
    entry = hub.disk_image(cfg, Runner(), kernel, fake_initramfs(tmp_path), BUSYBOX)
    disk = tmp_path / "disk.img"
    disk.write_bytes(gzip.decompress((entry / "disk.img.gz").read_bytes()))
    assert disk.stat().st_size == hub.DISK_SIZE_MIB << 20
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    (part,) = table["partitions"]
    assert part["start"] == hub.PART_START_MIB << 11 and part["name"] == "installed"
    fs = tmp_path / "part.img"
    with disk.open("rb") as src, fs.open("wb") as dst:
        src.seek(part["start"] * 512)
        dst.write(src.read(part["size"] * 512))

    def cat(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(fs)], capture_output=True, check=True).stdout

    assert cat("/boot/vmlinuz") == kernel.read_bytes()
    assert cat("/bin/busybox") == BUSYBOX.read_bytes()
    initrd = {m.name: m.data for m in cpio.members(cat("/boot/initrd"))}
    assert b"insmod /lib/modules/ext4.ko" in initrd["init"]
    again = hub.disk_image(cfg, Runner(), kernel, fake_initramfs(tmp_path), BUSYBOX)
    assert again == entry  # cached by its inputs


def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "actions"
    repo.mkdir()
    (repo / "go.sum").write_text("not the pinned go.sum\n")
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]
    for argv in (["init", "-q"], ["add", "go.sum"], commit):
        subprocess.run(["git", "-C", str(repo), *argv], check=True)
    return repo


def test_no_source_and_nothing_cached_builds_nothing(tmp_path):
    cfg = cfg_for(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    assert hub.images(cfg, Runner(), ca) is None
    assert not (tmp_path / "cache" / "hub-actions").exists()


def test_a_repository_without_the_pinned_commit_is_one_error(tmp_path):
    cfg = cfg_for(tmp_path, CAPTAINOS_HUB_ACTIONS=str(git_repo(tmp_path)))
    with pytest.raises(CaptainError, match=f"does not hold commit {pins.HUB_ACTIONS.commit[:12]}"):
        hub._source(cfg, Runner(), tmp_path / "src")


def test_a_changed_go_sum_is_refused(tmp_path, monkeypatch):
    repo = git_repo(tmp_path)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.setattr(pins, "HUB_ACTIONS", pins.SourcePin(pins.HUB_ACTIONS.repository, head, "0" * 64, ("kexec",)))
    cfg = cfg_for(tmp_path, CAPTAINOS_HUB_ACTIONS=str(repo))
    with pytest.raises(CaptainError, match="not the pinned"):
        hub._source(cfg, Runner(), tmp_path / "src")


def test_an_action_image_is_shaped_like_the_hubs():
    image = hub.action_image(Arch.AMD64, "kexec", b"\x7fELF binary", b"CA PEM")
    assert image.entrypoint == ("/usr/bin/kexec",)
    files = {m.path: m.data for m in image.members if m.data is not None}
    assert files == {"usr/bin/kexec": b"\x7fELF binary", "etc/ssl/certs/ca-certificates.crt": b"CA PEM"}
    assert image.labels["org.opencontainers.image.revision"] == pins.HUB_ACTIONS.commit
    layers, config_blob, _ = oci.image_blobs(image)
    assert json.loads(config_blob)["config"]["Entrypoint"] == ["/usr/bin/kexec"] and len(layers) == 1


def test_the_artifact_server_serves_extra_directories_and_nothing_outside(tmp_path):
    out, extra = tmp_path / "out", tmp_path / "hub"
    out.mkdir()
    extra.mkdir()
    (out / "vmlinuz-x86_64").write_text("kernel")
    (extra / "disk.img.gz").write_text("disk")
    (tmp_path / "secret").write_text("secret")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "captainos.lab.artifacts_server", "--bind", "127.0.0.1", "--port",
                             str(port), "--directory", str(out), "--extra", f"hub={extra}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        def get(path: str) -> tuple[int, bytes]:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                        return reply.status, reply.read()
                except urllib.error.HTTPError as exc:
                    return exc.code, b""
                except urllib.error.URLError:
                    time.sleep(0.1)
            raise AssertionError("the server did not start")

        assert get("/vmlinuz-x86_64") == (200, b"kernel")
        assert get("/hub/disk.img.gz") == (200, b"disk")
        assert get("/hub/../secret")[0] == 404 and get("/hub/%2e%2e/secret")[0] == 404
        assert get("/disk.img.gz")[0] == 404
    finally:
        proc.terminate()
        proc.wait(10)
