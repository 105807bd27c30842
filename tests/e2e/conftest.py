"""One CaptainOS image for every end-to-end scenario (session scope), trusting the harness CA.

The stages are built under the shared `lab_cfg` (tests/conftest.py: the Debian kernel, the
`test` profile, the harness CA), so the integration tests and these scenarios boot the very
same image. To use an image built elsewhere, set CAPTAINOS_E2E_KERNEL and
CAPTAINOS_E2E_INITRD (it must trust that same CA).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captainos.config import Config


@pytest.fixture(scope="session")
def e2e_cfg(lab_cfg: Config) -> Config:
    return lab_cfg


@pytest.fixture(scope="session")
def e2e_image(e2e_cfg: Config) -> tuple[Path, Path]:
    """(kernel, initramfs) of the image under test."""
    kernel, initrd = os.environ.get("CAPTAINOS_E2E_KERNEL"), os.environ.get("CAPTAINOS_E2E_INITRD")
    if kernel or initrd:
        if not (kernel and initrd):
            pytest.fail("set both CAPTAINOS_E2E_KERNEL and CAPTAINOS_E2E_INITRD")
        return Path(kernel), Path(initrd)  # type: ignore[arg-type]
    from captainos import pipeline

    kernel_entry = pipeline.build_kernel(e2e_cfg)
    tools_entry = pipeline.build_tools(e2e_cfg)
    initramfs_entry = pipeline.build_initramfs(e2e_cfg, kernel_entry, tools_entry)
    return kernel_entry / "vmlinuz", initramfs_entry / "initramfs.cpio.zst"


REPORTS = pytest.StashKey[list[tuple[str, str]]]()


@pytest.fixture(scope="session")
def e2e_reports(request: pytest.FixtureRequest) -> list[tuple[str, str]]:
    """(scenario, report) of every run; printed at the end of the session."""
    return request.config.stash.setdefault(REPORTS, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """The agent lines and the boot-to-provisioning timeline of each scenario, also in CI's
    log (pytest captures what the tests print)."""
    reports = config.stash.get(REPORTS, [])
    if reports:
        terminalreporter.section("CaptainOS end-to-end timelines")
        for name, text in reports:
            terminalreporter.write_line(f"--- {name}")
            terminalreporter.write_line(text)
