"""sources/kernel.py: choosing the kernel's source, identifying it (versions, digests of a
local tree) and unpacking it verified. kernel.org is replaced by a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from captainos.core import pins
from captainos.core.config import KernelSource, load
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import fetch
from captainos.sources import kernel as kernel_source

# --- source selection --------------------------------------------------------------------

def _cfg(tmp_path: Path, **env: str):
    return load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), **env})


def test_explicit_source_is_used_without_probing(tmp_path: Path) -> None:
    def probe() -> str | None:
        raise AssertionError("must not probe")
    cfg = _cfg(tmp_path, KERNEL_SOURCE="debian-image")
    assert kernel_source.select_source(cfg, probe) == (KernelSource.DEBIAN_IMAGE, "requested")


def test_auto_prefers_kernel_src(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SRC=str(tmp_path))
    assert cfg.kernel_source is KernelSource.LOCAL  # config.load maps KERNEL_SRC under auto to local
    assert kernel_source.select_source(cfg, lambda: None)[0] is KernelSource.LOCAL


def test_auto_uses_kernel_org_when_it_answers(tmp_path: Path) -> None:
    assert kernel_source.select_source(_cfg(tmp_path), lambda: None) == (KernelSource.KERNEL_ORG,
                                                                         "cdn.kernel.org answers")


def test_auto_falls_back_to_debian_source_with_reason(tmp_path: Path) -> None:
    kind, reason = kernel_source.select_source(_cfg(tmp_path), lambda: "cdn did not answer within 3s (timeout)")
    assert kind is KernelSource.DEBIAN_SOURCE and "did not answer" in reason


def test_probe_reports_an_unreachable_host() -> None:
    reason = kernel_source.probe_kernel_org("http://127.0.0.1:9", timeout=2)
    assert reason is not None and "127.0.0.1:9 did not answer" in reason



# --- kernel trees ------------------------------------------------------------------------

def _fake_tree(root: Path, version: str = "6.12.69") -> Path:
    """The least that tree_version() takes for a kernel tree."""
    major, minor, sub = version.split(".")
    root.mkdir(parents=True, exist_ok=True)
    (root / "Makefile").write_text(f"VERSION = {major}\nPATCHLEVEL = {minor}\nSUBLEVEL = {sub}\nEXTRAVERSION =\n")
    (root / "Kconfig").write_text("mainmenu \"Linux\"\n")
    (root / "arch" / "x86").mkdir(parents=True)
    return root


def test_tree_version_reads_the_makefile(tmp_path: Path) -> None:
    assert kernel_source.tree_version(_fake_tree(tmp_path / "linux", "6.12.69")) == "6.12.69"


def test_not_a_kernel_tree_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(CaptainError, match="does not look like a kernel tree"):
        kernel_source.tree_version(tmp_path)


def test_local_identity_mtime_digest_follows_edits(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    first = kernel_source.local_identity(tree)
    assert first.startswith("mtime:") and kernel_source.local_identity(tree) == first
    (tree / "Kconfig").write_text("mainmenu \"Linux edited\"\n")
    assert kernel_source.local_identity(tree) != first


def test_local_identity_git_head_and_dirty_diff(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = kernel_source.local_identity(tree)
    assert clean.startswith("git:")
    (tree / "Kconfig").write_text("changed\n")
    dirty = kernel_source.local_identity(tree)
    assert dirty != clean
    (tree / "new.c").write_text("int x;\n")
    untracked = kernel_source.local_identity(tree)
    assert untracked != dirty
    assert kernel_source.local_identity(tree) == untracked  # stable while nothing changes
    (tree / "new.c").write_text("int y;\n")
    assert kernel_source.local_identity(tree) != untracked


# --- kernel.org, served from 127.0.0.1 ---------------------------------------------------

@pytest.fixture()
def kernel_org(http_root: tuple[Path, str]) -> tuple[Path, str]:
    """A stand-in for cdn.kernel.org/pub/linux/kernel on 127.0.0.1."""
    root, base = http_root
    (root / "v6.x").mkdir()
    return root, base


def _tarball(version: str) -> bytes:
    """A linux-<version>.tar.xz holding a tree that passes tree_version()."""
    buf = BytesIO()
    files = {"Makefile": f"VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = {version.split('.')[2]}\n",
             "Kconfig": "mainmenu \"Linux\"\n", "arch/x86/include/asm/setup.h": "#define COMMAND_LINE_SIZE 2048\n"}
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"linux-{version}/{name}")
            info.size = len(text)
            tar.addfile(info, BytesIO(text.encode()))
    return buf.getvalue()


def _publish(root: Path, version: str, data: bytes, listed: bytes | None = None) -> None:
    (root / "v6.x" / f"linux-{version}.tar.xz").write_bytes(data)
    digest = hashlib.sha256(listed if listed is not None else data).hexdigest()
    (root / "v6.x" / "sha256sums.asc").write_text(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        f"{'1' * 64}  linux-6.1.1.tar.xz\n{digest}  linux-{version}.tar.xz\n"
        f"-----BEGIN PGP SIGNATURE-----\n{'2' * 64}  linux-{version}.tar.xz\n-----END PGP SIGNATURE-----\n")


def test_parse_sha256sums_reads_only_the_signed_body() -> None:
    text = (f"-----BEGIN PGP SIGNED MESSAGE-----\n\n{'a' * 64}  linux-6.12.69.tar.xz\n"
            f"-----BEGIN PGP SIGNATURE-----\n{'b' * 64}  linux-6.12.70.tar.xz\n")
    assert fetch.parse_sha256sums(text) == {"linux-6.12.69.tar.xz": "a" * 64}


def test_kernel_org_good_tarball_is_extracted(kernel_org, tmp_path: Path, capsys) -> None:
    root, base = kernel_org
    data = _tarball("6.12.70")
    _publish(root, "6.12.70", data)
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.70")
    source = kernel_source.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == hashlib.sha256(data).hexdigest()
    assert source.url == f"{base}/v6.x/linux-6.12.70.tar.xz"
    # Not pinned: the user is told where the digest came from instead.
    assert "linux-6.12.70.tar.xz has no sha256 in pins.py" in capsys.readouterr().err
    tree = tmp_path / "build" / "src"
    kernel_source.prepare_tree(Runner(), source, tree, cfg.cache_dir)
    assert kernel_source.tree_version(tree) == "6.12.70"
    assert (tree / ".captainos-source").read_text().strip() == source.identity


def test_kernel_org_tampered_tarball_extracts_nothing(kernel_org, tmp_path: Path) -> None:
    root, base = kernel_org
    _publish(root, "6.12.70", _tarball("6.12.70") + b"tampered", listed=_tarball("6.12.70"))
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.70")
    source = kernel_source.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    tree = tmp_path / "build" / "src"
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        kernel_source.prepare_tree(Runner(), source, tree, cfg.cache_dir)
    assert not tree.exists()
    assert not list((tmp_path / "cache" / "downloads").rglob("*.tar.xz"))


def test_the_default_kernel_needs_no_list_from_kernel_org(kernel_org, tmp_path: Path) -> None:
    _, base = kernel_org  # serves nothing: the pin alone decides
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org")
    source = kernel_source.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == pins.KERNEL_ORG_SHA256[cfg.kernel_version]


def test_kernel_org_pin_wins_over_the_published_list(kernel_org, tmp_path: Path, monkeypatch) -> None:
    root, base = kernel_org
    data = _tarball("6.12.69")
    _publish(root, "6.12.69", data)
    monkeypatch.setitem(pins.KERNEL_ORG_SHA256, "6.12.69", "f" * 64)
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.69")
    source = kernel_source.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == "f" * 64
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        kernel_source.prepare_tree(Runner(), source, tmp_path / "src", cfg.cache_dir)


def test_kernel_org_unknown_version(kernel_org, tmp_path: Path) -> None:
    root, base = kernel_org
    _publish(root, "6.12.69", _tarball("6.12.69"))
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.999")
    with pytest.raises(CaptainError, match=r"unknown kernel version 6\.12\.999"):
        kernel_source.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
