"""Shared fixtures: a local HTTP server for download tests (the only network unit tests use),
and, for the integration and end-to-end tests, one configuration under which each stage is
built once per session (cache hits after the first run)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What `-n auto` (pyproject's addopts) means: the default run, the fast suite, spreads over
    every core; a run given its own -m (CI's, the VM tests') stays in one process, where the
    session fixtures build each image once and the VM tests set their own parallelism.
    PYTEST_XDIST_AUTO_NUM_WORKERS still overrides both."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    addopts = config.getini("addopts")
    default = addopts[addopts.index("-m") + 1]
    return len(os.sched_getaffinity(0)) if config.option.markexpr == default else 0


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(directory, base URL) of a throwaway HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits for the next poll (0.5 s by default, per test).
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def lab_config(kernel_source: str, out_dir: Path):  # type: ignore[no-untyped-def]
    """The test profile with the end-to-end harness's CA in the trust store, on the given
    kernel source, writing to out_dir."""
    from captainos.core import config
    from captainos.core.run import Runner
    from captainos.lab import registry

    cache = {k: v for k, v in os.environ.items() if k in ("CAPTAINOS_CACHE", "CAPTAINOS_HUB_ACTIONS")}
    ca = registry.ensure_ca(config.load(env=cache).cache_dir, Runner())
    env = {
        **cache,
        "ARCH": "amd64",
        "KERNEL_SOURCE": kernel_source,
        "PROFILES": "test",
        "EXTRA_CA_CERTS": str(ca.cert),
        "OUT_DIR": str(out_dir),
        "QEMU_ACCEL": os.environ.get("QEMU_ACCEL", "tcg"),  # KVM guests hang on the CI host
        "QEMU_MEM": os.environ.get("QEMU_MEM", "2G"),
    }
    return config.load(env=env)


@pytest.fixture(scope="session")
def make_lab_cfg():  # type: ignore[no-untyped-def]
    """lab_config, for a test that needs the lab on another kernel source."""
    return lab_config


@pytest.fixture(scope="session")
def lab_cfg(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The Debian-kernel mode (KERNEL_SOURCE overrides): the integration tests and every
    end-to-end scenario share this one image."""
    return lab_config(os.environ.get("KERNEL_SOURCE", "debian-image"), tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="session")
def kernel_entry(lab_cfg) -> Path:  # type: ignore[no-untyped-def]
    from captainos.stages import pipeline

    return pipeline.build_kernel(lab_cfg)


@pytest.fixture(scope="session")
def arm64(lab_cfg, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(config, vmlinuz, initramfs) of the arm64 test image (built through qemu-user)."""
    import dataclasses

    from captainos.core.config import Arch
    from captainos.stages import pipeline

    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not Arch.ARM64.is_host() and not binfmt.exists():
        pytest.fail("qemu-aarch64 is not registered in binfmt_misc: run './build.py setup' as root")
    cfg = dataclasses.replace(lab_cfg, arch=Arch.ARM64, out_dir=tmp_path_factory.mktemp("out-arm64"))
    kernel_entry = pipeline.build_kernel(cfg)
    initramfs_entry = pipeline.build_initramfs(cfg, kernel_entry, pipeline.build_tools(cfg))
    return cfg, kernel_entry, initramfs_entry / "initramfs.cpio.zst"


def _smee_patch(iso: Path, params: str, output: Path) -> None:
    """What Smee does to an ISO it serves: overwrite the command-line placeholder in place,
    padded with spaces (same size). A model for the ISO tests; the lab runs the real Smee."""
    from captainos.core import cache, pins
    from captainos.core.errors import CaptainError

    data = bytearray(iso.read_bytes())
    magic = pins.ISO_MAGIC.encode()
    at = data.find(magic)
    if at < 0:
        raise CaptainError(f"{iso} has no command-line placeholder")
    patch = params.encode()
    if len(patch) > len(magic):
        raise CaptainError(f"kernel parameters are {len(patch)} bytes; the placeholder holds {len(magic)}")
    data[at:at + len(magic)] = patch.ljust(len(magic), b" ")
    cache.atomic_write(output, bytes(data))


@pytest.fixture
def smee_patch():  # type: ignore[no-untyped-def]
    """_smee_patch, for the tests of a Smee-patched ISO."""
    return _smee_patch
