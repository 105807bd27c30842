"""The image tree: units verified, presets as an allow-list, shell scripts shellcheck-clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

IMAGE = Path(__file__).resolve().parents[2] / "image"

EXTRA = IMAGE / "mkosi.extra"
TEST_EXTRA = IMAGE / "mkosi.profiles" / "test" / "mkosi.extra"
UNIT_DIRS = [EXTRA / "usr/lib/systemd/system", TEST_EXTRA / "usr/lib/systemd/system"]
# Binaries the tools stage adds as an extra tree (not in image/).
FROM_TOOLS = {"/usr/bin/containerd", "/usr/lib/captainos/reboot-guard"}


def units() -> list[Path]:
    """The unit files we wrote (not the masks: links to /dev/null)."""
    return sorted(p for d in UNIT_DIRS for pattern in ("*.service", "*.path") for p in d.glob(pattern)
                  if not (p.is_symlink() and os.readlink(p) == "/dev/null"))


def shell_scripts() -> list[Path]:
    found = []
    for path in sorted(IMAGE.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        first = path.read_bytes().split(b"\n", 1)[0]
        if path.suffix == ".sh" or first in (b"#!/bin/bash", b"#!/bin/sh"):
            found.append(path)
    return found


def test_every_shell_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {"init", "lib.sh", "network-setup", "selftest"}, scripts
    lib_dir = EXTRA / "usr/lib/captainos"
    result = subprocess.run(["shellcheck", "-x", "--severity=style", "-P", str(lib_dir), *map(str, scripts)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_every_script_is_executable_and_strict():
    for script in shell_scripts():
        if script.name == "lib.sh":
            continue
        assert os.access(script, os.X_OK), script
        assert re.search(r"^set -e(u|uo pipefail)", script.read_text(), re.M), f"{script} lacks set -e..."


def test_units_pass_systemd_analyze_verify():
    """Host systemd (252 here) checks syntax and directives; the only findings we accept are
    'not executable' for commands that exist in the image tree or come from the tools stage."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    paths = [str(p).replace("@.service", "@test.service") if p.name.endswith("@.service") else str(p)
             for p in units()]
    # Template units are verified through an instance: a symlink named like one.
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"captainos-verify-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    args = []
    for original, path in zip(units(), paths, strict=True):
        if original.name.endswith("@.service"):
            link = tmp / Path(path).name
            shutil.copy(original, link)
            args.append(str(link))
        else:
            args.append(path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *args], capture_output=True, text=True,
                            check=False, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    shutil.rmtree(tmp)
    problems = []
    for line in (result.stdout + result.stderr).splitlines():
        missing = re.search(r"Command (\S+) is not executable", line)
        if missing and (missing.group(1) in FROM_TOOLS or (EXTRA / missing.group(1).lstrip("/")).exists()
                        or (TEST_EXTRA / missing.group(1).lstrip("/")).exists()):
            continue
        problems.append(line)
    assert problems == [], "\n".join(problems)


def test_presets_are_an_allow_list_covering_our_units():
    preset = (EXTRA / "usr/lib/systemd/system-preset/50-captainos.preset").read_text().splitlines()
    rules = [line for line in preset if line and not line.startswith("#")]
    assert rules[-1] == "disable *"
    enabled = {line.split()[1] for line in rules if line.startswith("enable ")}
    for unit in (u for u in units() if u.is_relative_to(EXTRA)):
        if "[Install]" in unit.read_text():
            assert unit.name in enabled, f"{unit.name} has [Install] but is not in the preset allow-list"
    test_preset = (TEST_EXTRA / "usr/lib/systemd/system-preset/40-captainos-test.preset").read_text()
    assert "enable captainos-selftest.service" in test_preset
    assert "40-captainos-test.preset" < "50-captainos.preset"  # sorts first, so "disable *" does not win


def test_conditional_units_start_only_for_provisioning():
    for name in ("tink-agent-setup.service", "tink-agent.service"):
        text = (EXTRA / "usr/lib/systemd/system" / name).read_text()
        assert "ConditionKernelCommandLine=|tink_worker_image" in text
        assert "ConditionKernelCommandLine=|docker_registry" in text
    agent = (EXTRA / "usr/lib/systemd/system/tink-agent.service").read_text()
    assert "Restart=always" in agent and "StartLimitIntervalSec=0" in agent
    syslog = (EXTRA / "usr/lib/systemd/system/captainos-syslog@.service").read_text()
    assert "ConditionKernelCommandLine=syslog_host" in syslog
    # The network unit runs only with something to write (it sits on networkd's start).
    network = (EXTRA / "usr/lib/systemd/system/captainos-network.service").read_text()
    for param in ("ipam", "vlan_id", "interface", "hw_addr"):
        assert f"ConditionKernelCommandLine=|{param}\n" in network


def test_boot_target_first_boot_and_resolv_conf():
    assert os.readlink(EXTRA / "usr/lib/systemd/system/default.target") == "multi-user.target"
    assert os.readlink(EXTRA / "etc/systemd/system/systemd-firstboot.service") == "/dev/null"
    # ldconfig is removed from the image (its cache is built at build time): no boot-time run.
    assert os.readlink(EXTRA / "etc/systemd/system/ldconfig.service") == "/dev/null"
    # Modules for code our kernel has built in (and nothing here needs with Debian's): masked
    # in /usr/lib, since mkosi's `systemctl preset-all` removes template-instance masks in /etc.
    for name in ("drm", "fuse", "configfs"):
        assert os.readlink(EXTRA / f"usr/lib/systemd/system/modprobe@{name}.service") == "/dev/null"
    # Units on udevd's way that have nothing to do here (issue 17): the static device nodes are
    # written at build time (mkosi.postinst.chroot), and tmpfiles-setup-dev creates every /dev
    # node the early pass would; a RAM OS has no journal to flush and no seed to load.
    # Nor does it keep anything across boots: networkd's "persistent" state directory and a
    # committed machine id would both be RAM.
    for name in ("kmod-static-nodes", "systemd-tmpfiles-setup-dev-early", "systemd-journal-flush",
                 "systemd-random-seed", "systemd-networkd-persistent-storage", "systemd-machine-id-commit"):
        assert os.readlink(EXTRA / f"usr/lib/systemd/system/{name}.service") == "/dev/null"
    # These two keep working when asked: a dracut-style network parameter or a credential.
    generator = (EXTRA / "usr/lib/systemd/system/systemd-network-generator.service.d"
                 / "captainos-only-when-asked.conf").read_text()
    for param in ("ip", "nameserver", "vlan", "bond", "bridge"):
        assert f"ConditionKernelCommandLine=|{param}\n" in generator
    credentials = (EXTRA / "usr/lib/systemd/system/systemd-udev-load-credentials.service.d"
                   / "captainos-only-when-asked.conf").read_text()
    assert "ConditionDirectoryNotEmpty=|/run/credentials/@system" in credentials
    # Shipped "updated": the ConditionNeedsUpdate= units skip at boot (the build did their work).
    assert (EXTRA / "etc/.updated").is_file() and (EXTRA / "var/.updated").is_file()
    # resolv-conf writes it, the boot NIC's servers first (resolved's own file orders links by
    # its hash table); wait-online runs it before the machine is online, the path unit after.
    assert os.readlink(EXTRA / "etc/resolv.conf") == "/run/captainos/resolv.conf"
    online = (EXTRA / "usr/lib/systemd/system/systemd-networkd-wait-online.service.d/captainos-any.conf").read_text()
    assert "ExecStartPost=-/usr/lib/captainos/resolv-conf" in online  # its failure is no network failure
    resolv_path = (EXTRA / "usr/lib/systemd/system/captainos-resolv.path").read_text()
    assert "PathChanged=/run/systemd/netif/links" in resolv_path
    assert not (EXTRA / "etc/initrd-release").exists()
    assert not (EXTRA / "etc/machine-id").exists()


def test_test_profile_is_not_in_the_shipped_tree():
    assert not list(EXTRA.rglob("*selftest*"))
    conf = (IMAGE / "mkosi.conf").read_text()
    assert "busybox" not in conf


def test_mkosi_conf_essentials():
    conf = (IMAGE / "mkosi.conf").read_text()
    # Compression is segments.py's (zstd -19 with a long window), not mkosi's.
    for line in ("Format=cpio", "CompressOutput=no", "WithDocs=no", "Release=trixie",
                 "ToolsTree=default", "ToolsTreeDistribution=debian", "ToolsTreeRelease=trixie",
                 "ToolsTreeSandboxTrees=mkosi.sandbox", "MakeInitrd=no"):
        assert re.search(rf"^{re.escape(line)}$", conf, re.M), line
    sources = (IMAGE / "mkosi.sandbox/etc/apt/sources.list.d/mkosi.sources").read_text()
    uris = [line for line in sources.splitlines() if line.startswith("URIs:")]
    assert "trixie-security" in sources and "trixie-updates" in sources
    assert uris and not any("debug" in line for line in uris)
    for arch_conf in (IMAGE / "mkosi.conf.d").glob("*.conf"):
        assert "[Match]\nArchitecture=" in arch_conf.read_text()


def test_init_starts_systemd_with_a_clean_environment_and_absolute_paths():
    """`env -i` leaves no PATH: every program after it is named by its path (a bare `chroot`
    there made every boot panic: "env: 'chroot': No such file or directory")."""
    import shlex

    line = next(x for x in (EXTRA / "init").read_text().splitlines() if x.startswith("exec env -i"))
    words = [w for w in shlex.split(line)[3:] if not re.match(r"^[A-Z_]+=", w)]
    assert words[0].startswith("/") and words[2].startswith("/"), line  # chroot, then systemd
    assert Path(words[0]).name == "chroot" and words[2] == "/usr/lib/systemd/systemd"
