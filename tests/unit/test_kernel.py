"""stages/kernel.py, the stage: what it refuses before any download, its cache key, the make
argv and how a failing make is reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captainos.core import cache
from captainos.core.config import Arch, KernelSource, load
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import kernel as kernel_source
from captainos.stages import kernel, kernel_config, kernel_patch


def _cfg(tmp_path: Path, **env: str):
    return load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), **env})


# --- refused before any download ---------------------------------------------------------

def test_invalid_version_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.12-rc1")
    with pytest.raises(CaptainError, match=r"invalid KERNEL_VERSION '6\.12-rc1'"):
        kernel.build(cfg, Runner())


def test_version_without_config_fails_before_download(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, KERNEL_SOURCE="kernel-org", KERNEL_VERSION="6.13.1", ARCH="arm64")
    with pytest.raises(CaptainError, match=r"no config for 6\.13 on arm64; available: 6\.12"):
        kernel.build(cfg, Runner())
    assert not (tmp_path / "cache").exists()


def test_a_kernel_src_that_is_not_a_tree_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    cfg = _cfg(tmp_path, KERNEL_SRC=str(tmp_path))
    with pytest.raises(CaptainError, match="does not look like a kernel tree"):
        kernel.build(cfg, Runner())


# --- cache keys --------------------------------------------------------------------------

def test_cache_key_follows_every_input(tmp_path: Path) -> None:
    frag = tmp_path / "6.12" / "amd64.config"
    frag.parent.mkdir()
    frag.write_text("CONFIG_A=y\n")
    src = kernel_source.Source(KernelSource.DEBIAN_SOURCE, "6.12.117", "a" * 64)

    def key(arch: Arch = Arch.AMD64, source: kernel_source.Source = src, compiler: str = "gcc 12.2.0") -> str:
        return cache.key(kernel.compile_parts(arch, source, [frag], compiler))

    base = key()
    assert key() == base
    assert key(arch=Arch.ARM64) != base
    assert key(source=kernel_source.Source(KernelSource.DEBIAN_SOURCE, "6.12.117", "b" * 64)) != base
    assert key(source=kernel_source.Source(KernelSource.KERNEL_ORG, "6.12.117", "a" * 64)) != base
    assert key(compiler="gcc 14.2.0") != base
    frag.write_text("CONFIG_A=m\n")
    assert key() != base


def test_cache_key_covers_the_code_of_every_module_the_kernel_is_made_from() -> None:
    # The stage was one module; split in four, an edit to any of them must still make a new key.
    made_from = (kernel, kernel_source, kernel_config, kernel_patch)
    assert sorted(Path(p).resolve() for p in kernel.CODE) == sorted(Path(str(m.__file__)).resolve() for m in made_from)


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
