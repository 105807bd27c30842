"""The runc wrapper containerd's shims call: containers are the OOM killer's first choice, and
/proc/cmdline is masked in them when it holds a registry password."""

from __future__ import annotations

import json
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


def shim_call(sandbox: Sandbox, spec: dict[str, object], cmdline: str, *argv: str) -> dict[str, object]:
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

