"""The runc wrapper containerd's shims call: containers are the OOM killer's first choice,
/proc/cmdline is masked in them when it holds a registry password, and a container in the host's
PID namespace has its reboot(2) calls sent to reboot-guard."""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING

import pytest

from tests.image.conftest import PROGRAMS

if TYPE_CHECKING:
    from tests.image.conftest import Sandbox

WRAPPER = PROGRAMS / "runtime" / "runc"
# The shape containerd writes: compact JSON, "linux" without maskedPaths for privileged specs.
PRIVILEGED = {"ociVersion": "1.2.0", "process": {"user": {"uid": 0, "gid": 0}, "args": ["/bin/sh"], "cwd": "/"},
              "root": {"path": "rootfs"}, "hostname": "x", "linux": {"namespaces": [{"type": "pid"}]}}
CONFINED = {**PRIVILEGED, "linux": {"maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]}}


HOST_PID = {**PRIVILEGED, "linux": {"namespaces": [{"type": "mount"}, {"type": "network"}]}}


def shim_call(sandbox: Sandbox, spec: dict[str, object], cmdline: str, *argv: str) -> dict[str, object]:
    sandbox.env.setdefault("GUARD_SOCKET", str(sandbox.tmp / "no-guard.sock"))
    bundle = sandbox.tmp / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec, separators=(",", ":")))
    sandbox.cmdline(cmdline)
    sandbox.env["REAL_RUNC"] = str(sandbox.fake("real-runc"))
    args = [a.replace("BUNDLE", str(bundle)) for a in argv]
    result = sandbox.run(WRAPPER, *args)
    assert result.returncode == 0, result.stderr
    assert sandbox.call_lines() == ["real-runc " + " ".join(args)]  # the real runc gets the call unchanged
    return json.loads((bundle / "config.json").read_text())


SHIM_CREATE = ("--root", "/run/containerd/runc/tinkerbell", "--log", "BUNDLE/log.json", "--log-format", "json",
               "create", "--bundle", "BUNDLE", "--pid-file", "BUNDLE/init.pid", "action-1")


def test_containers_get_the_highest_oom_score(sandbox):
    spec = shim_call(sandbox, PRIVILEGED, "console=ttyS0", *SHIM_CREATE)
    assert spec["process"]["oomScoreAdj"] == 1000  # type: ignore[index]
    assert "maskedPaths" not in spec["linux"]  # type: ignore[operator]


@pytest.mark.parametrize("base", [PRIVILEGED, CONFINED])
def test_a_registry_password_masks_proc_cmdline(sandbox, base):
    spec = shim_call(sandbox, base, "a=1 registry_password=x", *SHIM_CREATE)
    masked = spec["linux"]["maskedPaths"]  # type: ignore[index]
    assert masked[0] == "/proc/cmdline"
    assert masked[1:] == base["linux"].get("maskedPaths", [])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("cmdline", "masked"), [
    ("HTTPS_PROXY=http://u:s3cret@proxy.local:3128", True), ('HTTP_PROXY="http://token@proxy:3128"', True),
    ("HTTP_PROXY=http://proxy.local:3128 NO_PROXY=u@x", False), ("console=ttyS0 x=http://u:p@h", False)])
def test_a_proxy_url_with_credentials_masks_proc_cmdline_too(sandbox, cmdline, masked):
    spec = shim_call(sandbox, PRIVILEGED, cmdline, *SHIM_CREATE)
    assert ("/proc/cmdline" in spec["linux"].get("maskedPaths", [])) is masked  # type: ignore[attr-defined]


def test_a_value_the_spec_has_wins(sandbox):
    # Python's json, like Go's encoding/json, keeps the last of two equal keys.
    base = {**PRIVILEGED, "process": {**PRIVILEGED["process"], "oomScoreAdj": -5}}  # type: ignore[dict-item]
    spec = shim_call(sandbox, base, "", *SHIM_CREATE)
    assert spec["process"]["oomScoreAdj"] == -5  # type: ignore[index]


@pytest.mark.parametrize("argv", [("--root", "/r", "state", "action-1"), ("--root", "/r", "delete", "create"),
                                  ("--root", "/r", "start", "--bundle", "BUNDLE")])
def test_other_calls_change_nothing(sandbox, argv):
    spec = shim_call(sandbox, PRIVILEGED, "registry_password=x", *argv)
    assert spec == PRIVILEGED



# --- reboot(2) of host-PID containers goes to reboot-guard ------------------------------------------------------

@pytest.fixture
def guard(sandbox):
    """A listening unix socket where the guard's would be."""
    path = sandbox.tmp / "guard.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    sandbox.env["GUARD_SOCKET"] = str(path)
    yield path
    server.close()


@pytest.mark.parametrize(("hosttype", "arches"), [
    ("x86_64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    ("aarch64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
])
def test_a_host_pid_container_sends_reboot_to_the_guard(sandbox, guard, hosttype, arches):
    sandbox.env["HOSTTYPE"] = hosttype
    spec = shim_call(sandbox, HOST_PID, "registry_password=x", *SHIM_CREATE)
    assert spec["linux"]["seccomp"] == {  # type: ignore[index]
        "defaultAction": "SCMP_ACT_ALLOW", "listenerPath": str(guard), "architectures": arches,
        "syscalls": [{"names": ["reboot"], "action": "SCMP_ACT_NOTIFY"}]}
    assert spec["linux"]["namespaces"] == HOST_PID["linux"]["namespaces"]  # type: ignore[index]
    assert spec["linux"]["maskedPaths"] == ["/proc/cmdline"]  # type: ignore[index]
    assert spec["process"]["oomScoreAdj"] == 1000  # type: ignore[index]


def test_a_spec_with_an_empty_linux_object_gets_the_profile(sandbox, guard):
    spec = shim_call(sandbox, {**PRIVILEGED, "linux": {}}, "", *SHIM_CREATE)
    assert spec["linux"]["seccomp"]["listenerPath"] == str(guard)  # type: ignore[index]


@pytest.mark.parametrize("why", ["own pid namespace", "own profile", "no guard", "unknown machine"])
def test_no_profile_where_reboot_is_not_ours_to_defer(sandbox, guard, why):
    own_profile = {**HOST_PID, "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}
    spec_in = {"own pid namespace": PRIVILEGED, "own profile": own_profile}.get(why, HOST_PID)
    if why == "no guard":
        sandbox.env["GUARD_SOCKET"] = str(sandbox.tmp / "absent.sock")
    if why == "unknown machine":
        sandbox.env["HOSTTYPE"] = "riscv64"
    spec = shim_call(sandbox, spec_in, "", *SHIM_CREATE)
    assert spec["linux"].get("seccomp") == spec_in["linux"].get("seccomp")  # type: ignore[union-attr,index]
