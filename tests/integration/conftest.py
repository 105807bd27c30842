"""Session fixtures shared by the integration and end-to-end tests.

One configuration, and each stage built once per session (cache hits after the first run):
the Debian-kernel mode, the container stack from Go modules (or releases where reachable),
and the initramfs with the `test` profile, trusting the end-to-end harness's CA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captainos import config
from captainos.config import Config


@pytest.fixture(scope="session")
def lab_cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    env = {
        "ARCH": "amd64",
        "KERNEL_SOURCE": os.environ.get("KERNEL_SOURCE", "debian-image"),
        "PROFILES": "test",
        "OUT_DIR": str(tmp_path_factory.mktemp("out")),
        "QEMU_ACCEL": "tcg",
    }
    if "CAPTAINOS_CACHE" in os.environ:
        env["CAPTAINOS_CACHE"] = os.environ["CAPTAINOS_CACHE"]
    return config.load(env=env)


@pytest.fixture(scope="session")
def kernel_entry(lab_cfg: Config) -> Path:
    from captainos import pipeline

    return pipeline.build_kernel(lab_cfg)
