"""kernel.py: source selection and verification, cache keys, make argv, the config checker
and the Debian module closure. kernel.org is replaced by a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from captainos.core import cache, pins
from captainos.core.config import Arch, KernelSource, load
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import fetch
from captainos.stages import kernel

# --- configs on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(Arch))
def test_fragments_of_every_series_are_well_formed(arch: Arch) -> None:
    for kseries in kernel.available_series(arch):
        paths = kernel.config_fragments(kseries, arch)
        assert paths[-1].name == f"{arch.value}.config"
        seen: dict[str, str] = {}
        for path in paths:
            lines = path.read_text().splitlines()
            assert lines[0].startswith("# "), f"{path} starts without a comment"
            for line in lines:
                assert (not line or line.startswith("#") or re.match(r"^CONFIG_\w+=(y|m|\"[^\"]*\"|[0-9]+)$", line)), \
                    f"{path}: {line!r}"
                if m := re.match(r"^(CONFIG_\w+)=", line):
                    assert m[1] not in seen, f"{m[1]} set twice ({seen.get(m[1])} and {path.name})"
                    seen[m[1]] = path.name
            # Every section starts with a '# ---' heading before its first option.
            text = path.read_text()
            first_option = re.search(r"^CONFIG_", text, re.MULTILINE)
            assert first_option and "# ---" in text[:first_option.start()], f"{path}: options before a section"


def test_6_12_exists_for_both_arches() -> None:
    assert "6.12" in kernel.available_series(Arch.AMD64)
    assert "6.12" in kernel.available_series(Arch.ARM64)


@pytest.mark.parametrize("arch", [Arch.ARM64])
def test_arm64_sets_the_clock_from_the_rtc_at_boot(arch: Arch) -> None:
    # arm64 has no early clock but the RTC: without it TLS to the registry fails (the clock
    # starts at systemd's epoch) until NTP answers. Seen under qemu-system-aarch64, 2026-12-02.
    for kseries in kernel.available_series(arch):
        text = "\n".join(p.read_text() for p in kernel.config_fragments(kseries, arch))
        assert "\nCONFIG_RTC_HCTOSYS=y\n" in text + "\n", kseries


def test_missing_series_lists_what_exists() -> None:
    with pytest.raises(CaptainError, match=r"no config for 6\.13 on arm64; available: 6\.12"):
        kernel.config_fragments("6.13", Arch.ARM64)


def test_fragments_without_common(tmp_path: Path) -> None:
    (tmp_path / "7.1").mkdir()
    (tmp_path / "7.1" / "amd64.config").write_text("# x\n")
    assert kernel.config_fragments("7.1", Arch.AMD64, root=tmp_path) == [tmp_path / "7.1" / "amd64.config"]


def test_required_list_parses_without_duplicates() -> None:
    reqs = kernel.read_required()
    options = [r.option for r in reqs]
    assert len(options) == len(set(options))
    assert "CONFIG_OVERLAY_FS" in options and "CONFIG_RD_ZSTD" in options


def test_required_list_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "required.txt"
    bad.write_text("CONFIG_OK\nOVERLAY_FS overlay\n")
    with pytest.raises(CaptainError, match=r"required.txt:2: expected"):
        kernel.read_required(bad)


@pytest.mark.parametrize("arch", list(Arch))
def test_debian_module_list_per_arch(arch: Arch) -> None:
    names = kernel.read_module_list(arch)
    assert "overlay" in names and "br_netfilter" in names
    assert ("vmd" in names) == (arch is Arch.AMD64)


def test_module_list_rejects_unknown_arch(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("riscv64: foo\n")
    with pytest.raises(CaptainError, match="unknown architecture 'riscv64:'"):
        kernel.read_module_list(Arch.AMD64, tmp_path / "m.txt")


# --- source selection --------------------------------------------------------------------

def _cfg(tmp_path: Path, **env: str):
    return load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), **env})


def test_explicit_source_is_used_without_probing(tmp_path: Path) -> None:
    def probe() -> str | None:
        raise AssertionError("must not probe")
    cfg = _cfg(tmp_path, KERNEL_SOURCE="debian-image")
    assert kernel.select_source(cfg, probe) == (KernelSource.DEBIAN_IMAGE, "requested")


def test_auto_prefers_kernel_src(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SRC=str(tmp_path))
    assert cfg.kernel_source is KernelSource.LOCAL  # config.load maps KERNEL_SRC under auto to local
    assert kernel.select_source(cfg, lambda: None)[0] is KernelSource.LOCAL


def test_auto_uses_kernel_org_when_it_answers(tmp_path: Path) -> None:
    assert kernel.select_source(_cfg(tmp_path), lambda: None) == (KernelSource.KERNEL_ORG, "cdn.kernel.org answers")


def test_auto_falls_back_to_debian_source_with_reason(tmp_path: Path) -> None:
    kind, reason = kernel.select_source(_cfg(tmp_path), lambda: "cdn did not answer within 3s (timeout)")
    assert kind is KernelSource.DEBIAN_SOURCE and "did not answer" in reason


def test_probe_reports_an_unreachable_host() -> None:
    reason = kernel.probe_kernel_org("http://127.0.0.1:9", timeout=2)
    assert reason is not None and "127.0.0.1:9 did not answer" in reason


def test_invalid_version_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12-rc1")
    with pytest.raises(CaptainError, match=r"invalid KERNEL_VERSION '6\.12-rc1'"):
        kernel.build(cfg, Runner())


def test_version_without_config_fails_before_download(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.13.1", ARCH="arm64")
    with pytest.raises(CaptainError, match=r"no config for 6\.13 on arm64; available: 6\.12"):
        kernel.build(cfg, Runner())
    assert not (tmp_path / "cache").exists()


# init/Kconfig of Linux 6.12 around the symbol (the real text, tabs included).
INIT_KCONFIG = """config CC_VERSION_TEXT
\tstring

config INIT_ENV_ARG_LIMIT
\tint
\tdefault 32 if !UML
\tdefault 128 if UML
\thelp
\t  Maximum of each of the number of arguments and environment
\t  variables passed to init from the kernel command line.

config COMPILE_TEST
\tbool "Compile also drivers which will not load"
\tdefault n
"""


def _fake_tree(root: Path, version: str = "6.12.69") -> Path:
    major, minor, sub = version.split(".")
    root.mkdir(parents=True, exist_ok=True)
    (root / "Makefile").write_text(f"VERSION = {major}\nPATCHLEVEL = {minor}\nSUBLEVEL = {sub}\nEXTRAVERSION =\n")
    (root / "Kconfig").write_text("mainmenu \"Linux\"\n")
    (root / "arch" / "x86" / "include" / "asm").mkdir(parents=True)
    (root / "arch" / "x86" / "include" / "asm" / "setup.h").write_text(
        "#ifndef _ASM_X86_SETUP_H\n#define COMMAND_LINE_SIZE 2048\n#endif\n")
    (root / "init").mkdir()
    (root / "init" / "Kconfig").write_text(INIT_KCONFIG)
    return root


def test_tree_version_reads_the_makefile(tmp_path: Path) -> None:
    assert kernel.tree_version(_fake_tree(tmp_path / "linux", "6.12.69")) == "6.12.69"


def test_not_a_kernel_tree_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(CaptainError, match="does not look like a kernel tree"):
        kernel.tree_version(tmp_path)
    cfg = _cfg(tmp_path, KERNEL_SRC=str(tmp_path))
    with pytest.raises(CaptainError, match="does not look like a kernel tree"):
        kernel.build(cfg, Runner())


def test_local_identity_mtime_digest_follows_edits(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    first = kernel.local_identity(tree)
    assert first.startswith("mtime:") and kernel.local_identity(tree) == first
    (tree / "Kconfig").write_text("mainmenu \"Linux edited\"\n")
    assert kernel.local_identity(tree) != first


def test_local_identity_git_head_and_dirty_diff(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = kernel.local_identity(tree)
    assert clean.startswith("git:")
    (tree / "Kconfig").write_text("changed\n")
    dirty = kernel.local_identity(tree)
    assert dirty != clean
    (tree / "new.c").write_text("int x;\n")
    untracked = kernel.local_identity(tree)
    assert untracked != dirty
    assert kernel.local_identity(tree) == untracked  # stable while nothing changes
    (tree / "new.c").write_text("int y;\n")
    assert kernel.local_identity(tree) != untracked


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
    source = kernel.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == hashlib.sha256(data).hexdigest()
    assert source.url == f"{base}/v6.x/linux-6.12.70.tar.xz"
    # Not pinned: the user is told where the digest came from instead.
    assert "linux-6.12.70.tar.xz has no sha256 in pins.py" in capsys.readouterr().err
    tree = tmp_path / "build" / "src"
    kernel._prepare_tree(cfg, Runner(), source, tree)
    assert kernel.tree_version(tree) == "6.12.70"
    assert (tree / ".captainos-source").read_text().strip() == source.identity


def test_kernel_org_tampered_tarball_extracts_nothing(kernel_org, tmp_path: Path) -> None:
    root, base = kernel_org
    _publish(root, "6.12.70", _tarball("6.12.70") + b"tampered", listed=_tarball("6.12.70"))
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.70")
    source = kernel.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    tree = tmp_path / "build" / "src"
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        kernel._prepare_tree(cfg, Runner(), source, tree)
    assert not tree.exists()
    assert not list((tmp_path / "cache" / "downloads").rglob("*.tar.xz"))


def test_the_default_kernel_needs_no_list_from_kernel_org(kernel_org, tmp_path: Path) -> None:
    _, base = kernel_org  # serves nothing: the pin alone decides
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org")
    source = kernel.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == pins.KERNEL_ORG_SHA256[cfg.kernel_version]


def test_kernel_org_pin_wins_over_the_published_list(kernel_org, tmp_path: Path, monkeypatch) -> None:
    root, base = kernel_org
    data = _tarball("6.12.69")
    _publish(root, "6.12.69", data)
    monkeypatch.setitem(pins.KERNEL_ORG_SHA256, "6.12.69", "f" * 64)
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.69")
    source = kernel.resolve(cfg, KernelSource.KERNEL_ORG, base=base)
    assert source.identity == "f" * 64
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        kernel._prepare_tree(cfg, Runner(), source, tmp_path / "src")


def test_kernel_org_unknown_version(kernel_org, tmp_path: Path) -> None:
    root, base = kernel_org
    _publish(root, "6.12.69", _tarball("6.12.69"))
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12.999")
    with pytest.raises(CaptainError, match=r"unknown kernel version 6\.12\.999"):
        kernel.resolve(cfg, KernelSource.KERNEL_ORG, base=base)


# --- cache keys --------------------------------------------------------------------------

def test_cache_key_follows_every_input(tmp_path: Path) -> None:
    frag = tmp_path / "6.12" / "amd64.config"
    frag.parent.mkdir()
    frag.write_text("CONFIG_A=y\n")
    src = kernel.Source(KernelSource.DEBIAN_SOURCE, "6.12.117", "a" * 64)

    def key(arch: Arch = Arch.AMD64, source: kernel.Source = src, compiler: str = "gcc 12.2.0") -> str:
        return cache.key(kernel.compile_parts(arch, source, [frag], compiler))

    base = key()
    assert key() == base
    assert key(arch=Arch.ARM64) != base
    assert key(source=kernel.Source(KernelSource.DEBIAN_SOURCE, "6.12.117", "b" * 64)) != base
    assert key(source=kernel.Source(KernelSource.KERNEL_ORG, "6.12.117", "a" * 64)) != base
    assert key(compiler="gcc 14.2.0") != base
    frag.write_text("CONFIG_A=m\n")
    assert key() != base


# --- make argv ---------------------------------------------------------------------------

def test_make_argv_amd64(tmp_path: Path) -> None:
    argv = kernel.make_argv(Arch.AMD64, "bzImage", 2, tmp_path)
    expected = ["make", "-j2", f"O={tmp_path}", "ARCH=x86"]
    if Arch.AMD64.cross_compile():
        expected.append(f"CROSS_COMPILE={Arch.AMD64.cross_compile()}")
    assert argv == [*expected, "bzImage"]


def test_make_argv_arm64_cross(tmp_path: Path) -> None:
    argv = kernel.make_argv(Arch.ARM64, ["Image", "modules"], 8, tmp_path, ["INSTALL_MOD_STRIP=1"])
    assert argv[:4] == ["make", "-j8", f"O={tmp_path}", "ARCH=arm64"]
    assert argv[-3:] == ["INSTALL_MOD_STRIP=1", "Image", "modules"]
    cross = [a for a in argv if a.startswith("CROSS_COMPILE=")]
    assert cross == ([] if Arch.ARM64.is_host() else ["CROSS_COMPILE=aarch64-linux-gnu-"])


# --- COMMAND_LINE_SIZE -------------------------------------------------------------------

def test_patch_command_line_size(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    header = kernel.patch_command_line_size(tree, Arch.AMD64)
    assert "#define COMMAND_LINE_SIZE 4096\n" in header.read_text()
    assert "_ASM_X86_SETUP_H" in header.read_text()
    kernel.patch_command_line_size(tree, Arch.AMD64)  # idempotent
    assert header.read_text().count("COMMAND_LINE_SIZE") == 1


def test_patch_arm64_uapi_header(tmp_path: Path) -> None:
    header = tmp_path / "arch/arm64/include/uapi/asm/setup.h"
    header.parent.mkdir(parents=True)
    header.write_text("#include <linux/types.h>\n\n#define COMMAND_LINE_SIZE\t2048\n")
    kernel.patch_command_line_size(tmp_path, Arch.ARM64)
    assert header.read_text().endswith("#define COMMAND_LINE_SIZE\t4096\n")


def test_patch_fails_loudly_without_the_define(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "arch/x86/include/asm/setup.h").write_text("/* moved */\n")
    with pytest.raises(CaptainError, match="no '#define COMMAND_LINE_SIZE'"):
        kernel.patch_command_line_size(tree, Arch.AMD64)


def test_patch_refuses_two_defines(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "arch/x86/include/asm/setup.h").write_text("#define COMMAND_LINE_SIZE 2048\n#define COMMAND_LINE_SIZE 1\n")
    with pytest.raises(CaptainError, match="2 times"):
        kernel.patch_command_line_size(tree, Arch.AMD64)


def test_patch_init_env_limit(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    kconfig = kernel.patch_init_env_limit(tree)
    text = kconfig.read_text()
    assert "\tdefault 128 if !UML\n\tdefault 128 if UML\n" in text
    assert "config COMPILE_TEST\n\tbool" in text and "\tdefault n\n" in text  # nothing else touched
    kernel.patch_init_env_limit(tree)  # idempotent
    assert kconfig.read_text() == text


def test_patch_init_env_limit_fails_loudly_when_the_symbol_moved(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "init" / "Kconfig").write_text(INIT_KCONFIG.replace("default 32 if !UML", "default 32"))
    with pytest.raises(CaptainError, match="non-UML defaults of INIT_ENV_ARG_LIMIT"):
        kernel.patch_init_env_limit(tree)


NAMESPACE_C = """static char * __initdata initramfs_options;
static int __init initramfs_options_setup(char *str)
{
	initramfs_options = str;
	return 1;
}
"""


def test_patch_initramfs_options_sets_the_default_once(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    source = tmp_path / "fs" / "namespace.c"
    source.write_text(NAMESPACE_C)
    assert kernel.patch_initramfs_options(tmp_path)
    text = source.read_text()
    assert text == NAMESPACE_C.replace("initramfs_options;", 'initramfs_options = "size=90%";', 1)
    assert kernel.patch_initramfs_options(tmp_path) and source.read_text() == text  # idempotent
    assert kernel.patch_initramfs_options(tmp_path, "size=80%")  # a changed value replaces the old one
    assert source.read_text().count('initramfs_options = "size=80%";') == 1


def test_a_kernel_without_initramfs_options_is_a_warning(tmp_path: Path, capsys) -> None:
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "namespace.c").write_text("static int other;\n")
    assert not kernel.patch_initramfs_options(tmp_path)
    assert "has no initramfs_options" in capsys.readouterr().err
    assert (tmp_path / "fs" / "namespace.c").read_text() == "static int other;\n"


def test_bzimage_cmdline_size(tmp_path: Path) -> None:
    image = bytearray(0x300)
    image[0x202:0x206] = b"HdrS"
    image[0x238:0x23C] = (4095).to_bytes(4, "little")
    (tmp_path / "bzImage").write_bytes(bytes(image))
    assert kernel.bzimage_cmdline_size(tmp_path / "bzImage") == 4095
    (tmp_path / "Image").write_bytes(bytes(0x300))
    with pytest.raises(CaptainError, match="not an x86 bzImage"):
        kernel.bzimage_cmdline_size(tmp_path / "Image")


# --- config checker ----------------------------------------------------------------------

RESOLVED = """\
CONFIG_A=y
CONFIG_B=m
# CONFIG_C is not set
CONFIG_S="-captainos"
"""


def test_parse_config() -> None:
    assert kernel.parse_config(RESOLVED) == {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": "n",
                                             "CONFIG_S": '"-captainos"'}


def test_fragment_mismatches() -> None:
    resolved = kernel.parse_config(RESOLVED)
    assert kernel.fragment_mismatches("CONFIG_A=y\nCONFIG_S=\"-captainos\"\n# CONFIG_C is not set\n", resolved) == []
    assert kernel.fragment_mismatches("CONFIG_A=m\n", resolved) == []  # selected as built in: fine
    assert kernel.fragment_mismatches("CONFIG_B=y\nCONFIG_D=y\n# CONFIG_A is not set\n", resolved) == [
        "CONFIG_B=y (got m)", "CONFIG_D=y (got n)", "CONFIG_A=n (got y)"]


def test_missing_options() -> None:
    resolved = kernel.parse_config(RESOLVED)
    reqs = [kernel.Requirement("CONFIG_A", None), kernel.Requirement("CONFIG_B", "b-mod"),
            kernel.Requirement("CONFIG_C", "c")]
    assert kernel.missing_options(reqs, resolved) == [
        "CONFIG_B (=m but module b-mod is not kept)", "CONFIG_C (not set)"]
    assert kernel.missing_options(reqs, resolved, {"b_mod"}) == ["CONFIG_C (not set)"]


def test_check_required_names_every_missing_option(tmp_path: Path) -> None:
    (tmp_path / "required.txt").write_text("# comment\nCONFIG_A\nCONFIG_C\nCONFIG_E\n")
    (tmp_path / "config").write_text(RESOLVED)
    with pytest.raises(CaptainError, match=r"lacks options CaptainOS needs: CONFIG_C \(not set\), CONFIG_E"):
        kernel.check_required(tmp_path / "config", required=tmp_path / "required.txt")
    (tmp_path / "required.txt").write_text("CONFIG_A\n")
    kernel.check_required(tmp_path / "config", required=tmp_path / "required.txt")


# --- Debian module closure ---------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/overlayfs/overlay.ko.xz:
kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/sound/snd.ko.xz:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz:
"""
SOFTDEP = "# comment\nsoftdep ext4 pre: crc32c_generic nonexistent_mod\n"


def test_module_closure_follows_hard_and_soft_dependencies() -> None:
    keep = kernel.module_closure(["br-netfilter", "ext4", "virtio_pci"], MODULES_DEP, SOFTDEP,
                                 ["kernel/drivers/virtio/virtio_pci.ko"])
    assert keep == sorted([
        "kernel/net/bridge/br_netfilter.ko.xz", "kernel/net/bridge/bridge.ko.xz", "kernel/net/802/stp.ko.xz",
        "kernel/net/llc/llc.ko.xz", "kernel/fs/ext4/ext4.ko.xz", "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/fs/mbcache.ko.xz", "kernel/crypto/crc32c_generic.ko.xz"])


def test_module_closure_rejects_unknown_names() -> None:
    with pytest.raises(CaptainError, match="modules neither built nor built in: nosuchmod"):
        kernel.module_closure(["overlay", "nosuchmod"], MODULES_DEP)


def test_module_name_normalises() -> None:
    assert kernel.module_name("kernel/net/bridge/br_netfilter.ko.xz") == "br_netfilter"
    assert kernel.module_name("nls_iso8859-1.ko.zst") == "nls_iso8859_1"
    assert kernel.module_name("xt_MASQUERADE") == "xt_MASQUERADE"


# --- failures ----------------------------------------------------------------------------

def test_failing_make_names_the_log_and_first_error(tmp_path: Path, monkeypatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "fake-make"
    fake.write_text("#!/bin/sh\necho '  CC      kernel/fork.o'\necho 'kernel/fork.c:1:2: error: boom' >&2\n"
                    "echo 'make: *** [Makefile:1: all] Error 2' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    log_file = tmp_path / "logs" / "compile.log"
    with pytest.raises(CaptainError) as info:
        kernel._make(Runner(), tmp_path, ["fake-make"], log_file)
    assert f"full log: {log_file}" in info.value.message
    assert info.value.hint == "first error: kernel/fork.c:1:2: error: boom"
    assert "kernel/fork.c:1:2: error: boom" in log_file.read_text()
