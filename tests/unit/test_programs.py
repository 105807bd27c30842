"""Our own programs (programs/): what the tools stage compiles, for both architectures.
(tests/image/test_reboot_guard.py runs reboot-guard against the kernel's seccomp.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import tools


@pytest.mark.parametrize("arch", [Arch.AMD64, Arch.ARM64])
def test_programs_are_compiled_for_the_target_and_cached(tmp_path: Path, arch: Arch) -> None:
    if shutil.which(tools.compiler(arch)) is None:
        pytest.skip(f"{tools.compiler(arch)} is not installed (./build.py setup installs it)")
    cfg = config.load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache")}, flags={"arch": arch.value})
    entry = tools.build_program(cfg, Runner(), "reboot-guard")
    binary = entry / "bin" / "reboot-guard"
    assert tools.elf_machine(binary) == arch.elf_machine()
    assert binary.stat().st_size < 100_000  # C against the image's glibc: no runtime of its own
    record = json.loads((entry / tools.COMPONENT).read_text())
    assert record["sources"] == tools.program_sources("reboot-guard")
    assert record["cc"].startswith(tools.compiler(arch))
    assert tools.build_program(cfg, Runner(), "reboot-guard") == entry  # cached by its inputs


def test_program_sources_name_every_file() -> None:
    files = tools.program_sources("reboot-guard")
    assert set(files) == {"reboot-guard.c"} and all(len(d) == 64 for d in files.values())


def test_a_program_without_source_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(tools, "PROGRAMS", tmp_path)
    with pytest.raises(CaptainError, match="holds no C source"):
        tools.program_sources("empty")


def test_a_program_that_does_not_compile_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.c").write_text("int main(void) { return undefined; }\n")
    monkeypatch.setattr(tools, "PROGRAMS", tmp_path)
    cfg = config.load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache")})
    with pytest.raises(CaptainError, match=r"compiling broken \(amd64\) failed"):
        tools.build_program(cfg, Runner(), "broken")
    assert [p.name for p in (tmp_path / "cache" / "tools-broken" / "amd64").iterdir() if p.suffix != ".lock"] == []
