"""The real tools stage: containerd, runc, nerdctl and the CNI plugins built from their Go modules.

Cold, the amd64 build takes several minutes (two parallel jobs); later runs are cache hits.
The cache is CAPTAINOS_CACHE (default ~/.cache/captainos), so a run after `./build.py tools`
reuses its entries. The arm64 cross build is marked slow as well; its binaries are run through
qemu-user-static when that is installed.
"""

import json
import os
import subprocess

import pytest

from captainos.core import config, pins
from captainos.core.config import Arch
from captainos.core.run import Runner
from captainos.stages import tools

pytestmark = pytest.mark.integration

PATHS = {f"{pin.dest}/{binary}": pin for pin in pins.TOOLS for binary in pin.binaries}


def build(arch: Arch):
    cfg = config.load(env=os.environ, flags={"arch": arch.value, "tools_source": "go"})
    return tools.build(cfg, Runner())


def elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def reported(path, binary: str, pin: pins.ToolPin) -> str:
    """What the binary prints for its version, read independently of tools.check_binary."""
    args = list(pin.version_args.get(binary, ("--version",)))
    env = {"PATH": "/usr/bin:/bin"}  # no CNI_COMMAND: a plugin prints "CNI <name> plugin v<version>"
    result = subprocess.run([path, *args], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, (path, result.stdout, result.stderr)
    return result.stdout + result.stderr


def check_entry(entry, arch: Arch) -> dict:
    manifest = json.loads((entry / "manifest.json").read_text())
    assert (entry / "tree/usr/share/captainos/tools-manifest.json").read_text() == (
        entry / "manifest.json").read_text()
    assert manifest["arch"] == arch.value
    tree = entry / "tree"
    found = sorted(str(p.relative_to(tree)) for p in tree.rglob("*")
                   if p.is_file() and "captainos" not in p.relative_to(tree).parts)
    assert found == sorted(PATHS)
    for rel, pin in PATHS.items():
        path = entry / "tree" / rel
        assert os.access(path, os.X_OK), rel
        assert elf_machine(path) == arch.elf_machine(), rel
        component = manifest["components"][pin.name]
        assert component["version"] == pin.version and component["source"] == "go"
        assert component["module_h1"] == pin.module_h1
        assert len(component["go_sum_sha256"]) == 64
    return manifest


@pytest.mark.skipif(not Arch.AMD64.is_host(), reason="runs the amd64 binaries")
def test_amd64_from_go_modules_reports_the_pinned_versions():
    entry = build(Arch.AMD64)
    check_entry(entry, Arch.AMD64)
    for rel, pin in PATHS.items():
        binary = rel.rsplit("/", 1)[1]
        text = reported(entry / "tree" / rel, binary, pin)
        assert tools.version_pattern(pin.version).search(text), (rel, text)
    runc = reported(entry / "tree/usr/bin/runc", "runc", pins.TOOLS[1])
    assert "libseccomp: 2.5.4" in runc, runc
    # Static where upstream is static (all of them): no program interpreter in any binary.
    for rel in PATHS:
        assert tools.is_static(entry / "tree" / rel), rel
    guard = entry / "tree/usr/lib/captainos/reboot-guard"
    assert elf_machine(guard) == Arch.AMD64.elf_machine()
    # Run with no connection on standard input: one error line, exit 1, nothing else done.
    result = subprocess.run([guard], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert json.loads(result.stderr)["msg"] == "no seccomp descriptor from runc; this container's reboot calls fail"


@pytest.mark.slow
def test_arm64_cross_build_from_go_modules():
    entry = build(Arch.ARM64)
    check_entry(entry, Arch.ARM64)
    for rel in PATHS:
        assert tools.is_static(entry / "tree" / rel), rel
    assert elf_machine(entry / "tree/usr/lib/captainos/reboot-guard") == Arch.ARM64.elf_machine()
    emulator = tools.emulator(Arch.ARM64)
    if emulator is None:
        pytest.skip("qemu-user-static is not installed: the arm64 binaries were built but not run")
    for rel, pin in PATHS.items():
        binary = rel.rsplit("/", 1)[1]
        args = list(pin.version_args.get(binary, ("--version",)))
        result = subprocess.run([emulator, entry / "tree" / rel, *args], env={"PATH": "/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0 and tools.version_pattern(pin.version).search(result.stdout + result.stderr), (
            rel, result.stdout, result.stderr)
