"""The in-image kernel option checker (kernel/check-kernel-config.sh), run on the host
against fixture configs and module indexes, under dash and busybox sh like in the image."""

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "kernel" / "check-kernel-config.sh"
SHELLS = [s for s in ("sh", "dash", "bash") if shutil.which(s)]


def _run(shell, tmp_path, config_text, required_text, modules_dep="", gz=False):
    config = tmp_path / ("config.gz" if gz else "config")
    if gz:
        config.write_bytes(gzip.compress(config_text.encode()))
    else:
        config.write_text(config_text)
    required = tmp_path / "required.txt"
    required.write_text(required_text)
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    (modules / "modules.dep").write_text(modules_dep)
    env = {"PATH": "/usr/bin:/bin", "KERNEL_CONFIG": str(config), "MODULES_DIR": str(modules),
           "KERNEL_RELEASE": "6.12.0-test"}
    return subprocess.run([shell, str(SCRIPT), str(required)], env=env, capture_output=True, text=True,
                          check=False)


@pytest.mark.parametrize("shell", SHELLS)
def test_all_present(shell, tmp_path):
    result = _run(shell, tmp_path, "CONFIG_A=y\nCONFIG_B=y\n", "# comment\nCONFIG_A\n\nCONFIG_B  # trailing\n")
    assert result.returncode == 0, result.stderr
    assert "all 2 required options present" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_missing_and_unavailable_modules_are_named(shell, tmp_path):
    dep = "kernel/net/bridge/bridge.ko.xz: kernel/net/llc/llc.ko.xz\nkernel/crypto/crc32c-generic.ko:\n"
    result = _run(shell, tmp_path, "CONFIG_BRIDGE=m\nCONFIG_VETH=m\nCONFIG_CRC=m\n# CONFIG_NOPE is not set\n",
                  "CONFIG_BRIDGE bridge\nCONFIG_VETH veth\nCONFIG_CRC crc32c_generic\nCONFIG_NOPE\n", dep)
    assert result.returncode == 1
    assert "missing: CONFIG_VETH (=m but module veth is not available)" in result.stderr
    assert "missing: CONFIG_NOPE (not set)" in result.stderr
    assert "CONFIG_BRIDGE" not in result.stderr and "CONFIG_CRC" not in result.stderr
    assert "2 of 4 required options missing" in result.stderr


def test_gzip_config_like_proc_config_gz(tmp_path):
    result = _run("sh", tmp_path, "CONFIG_A=y\n", "CONFIG_A\n", gz=True)
    assert result.returncode == 0, result.stderr


def test_malformed_list_is_a_usage_error(tmp_path):
    result = _run("sh", tmp_path, "CONFIG_A=y\n", "A_WITHOUT_PREFIX\n")
    assert result.returncode == 2 and "expected 'CONFIG_NAME [module]'" in result.stderr


def test_repo_list_is_well_formed():
    for line in (REPO / "kernel" / "required.txt").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        assert not words or (words[0].startswith("CONFIG_") and len(words) <= 2), line
