"""Bit-identical builds across histories and machines, as far as one machine can show it:
two copies of the checkout, each with its own empty cache dir and no object dirs, build the
same kernel, initramfs and package lock list. About an hour on two cores (two kernel compiles
and two Go builds of the tools): marked slow, run it by hand or through `bench --only repro`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captainos.core import cache, config
from captainos.core.config import Arch
from captainos.lab import bench
from captainos.stages import artifacts

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mkosi builds as root")]


def test_two_cold_builds_in_two_empty_cache_dirs_are_bit_identical(tmp_path: Path) -> None:
    outs = []
    for machine in ("one", "two"):
        checkout = bench.copy_checkout(tmp_path / machine / "checkout")
        outs.append(bench._build_in(checkout, tmp_path / machine / "cache", config.load(env={"ARCH": "amd64"})))
    for name in (artifacts.vmlinuz_name(Arch.AMD64), artifacts.initramfs_name(Arch.AMD64),
                 artifacts.lock_name(Arch.AMD64), artifacts.sbom_name(Arch.AMD64)):
        digests = [cache.sha256_file(out / name) for out in outs]
        if name.endswith(".cpio.zst") and digests[0] != digests[1]:
            pytest.fail(f"{name} differs: {bench.diff_archives(outs[0] / name, outs[1] / name)[:20]}")
        assert digests[0] == digests[1], name
