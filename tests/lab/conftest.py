"""One real-Tinkerbell lab for the module's scenarios, serving the shared test image.

The image is the one the integration and end-to-end tests boot (`lab_cfg` in tests/conftest.py:
the test profile, trusting the harness CA), plus its ISO, published into that config's out/
directory, which the lab serves as Smee's OSIE URL and ISO upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from captainos.core.config import Config
from captainos.lab.lab import Lab


@pytest.fixture(scope="session")
def lab_artifacts(lab_cfg: Config) -> Path:
    """out/ of the test image: vmlinuz-x86_64, initramfs-x86_64, the ISO and their sums (which
    the Helm chart's file server publishes)."""
    from captainos.stages import artifacts, pipeline

    kernel_entry = pipeline.build_kernel(lab_cfg)
    initramfs_entry = pipeline.build_initramfs(lab_cfg, kernel_entry, pipeline.build_tools(lab_cfg))
    pipeline.build_iso(lab_cfg, kernel_entry, initramfs_entry)
    artifacts.write_checksums(lab_cfg.out_dir, lab_cfg.arch)
    return lab_cfg.out_dir


@pytest.fixture(scope="session")
def real_lab(lab_cfg: Config, lab_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The real Tinkerbell with its registry, the ISO patcher and the Helm chart's nginx, up for
    the whole session."""
    root = tmp_path_factory.mktemp("lab")
    with Lab(lab_cfg, artifacts_dir=lab_artifacts, root=root, iso=True, chart=True) as lab:
        yield lab


REPORTS = pytest.StashKey[list[tuple[str, str]]]()


@pytest.fixture(scope="session")
def lab_reports(request: pytest.FixtureRequest) -> list[tuple[str, str]]:
    return request.config.stash.setdefault(REPORTS, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """Each scenario's actions and netboot timeline, also in CI's log."""
    reports = config.stash.get(REPORTS, [])
    if reports:
        terminalreporter.section("CaptainOS real-Tinkerbell lab timelines")
        for name, text in reports:
            terminalreporter.write_line(f"--- {name}")
            terminalreporter.write_line(text)
