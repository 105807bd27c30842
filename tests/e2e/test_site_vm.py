"""Operator features in a VM, with the real agent, containerd, dropbear and OpenSSH's client:
images embedded at build time run a workflow with every registry down, SSH takes the built-in
key and refuses another, and a registry mirror serves the agent image (but not the agent's
own action pulls, as the README says).

These run on the end-to-end harness (tests/e2e), not the real-Tinkerbell lab: the seams under
test are between the image, containerd, the agent and an SSH client, and none of them passes
through the workflow server. Every image name the VM may pull lives on 10.0.2.2:1 (the host's
port 1, closed): a lookup that misses is refused on the host and never leaves it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from captainos.core.run import Runner
from captainos.lab import e2e, oci, registry, vm
from captainos.stages import pipeline

pytestmark = pytest.mark.integration
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
EMBEDDED_AGENT = f"10.0.2.2:1/tinkerbell/tink-agent:{vm.AGENT_TAG}"
EMBEDDED_ACTION = "10.0.2.2:1/embedded/busybox:e2e"
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR")


@dataclasses.dataclass
class SiteImage:
    kernel: Path
    initrd: Path
    key: Path  # the key the image was built with
    other: Path  # a key it was not
    cmdline: Path  # a key given on the kernel command line
    entry: Path


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def site_image(lab_cfg, kernel_entry, tmp_path_factory) -> Iterator[SiteImage]:
    """The test image plus a site segment: the agent and the busybox action image embedded
    under names on 10.0.2.2:1, and an SSH key. Built against a registry that is gone before
    any VM boots; the build host trusts it through /etc/containers/certs.d, as an operator's would."""
    work = tmp_path_factory.mktemp("site")
    runner = Runner()
    layouts = vm.images(lab_cfg, runner)
    key, other, cmdline = keygen(work / "id_site"), keygen(work / "id_other"), keygen(work / "id_cmdline")
    ca = registry.ensure_ca(lab_cfg.cache_dir, runner)
    with registry.Registry(ca, work, "build-registry") as reg:
        trust = Path("/etc/containers/certs.d") / reg.host_address
        trust.mkdir(parents=True)
        try:
            shutil.copy(reg.cert_dir / "ca.crt", trust / "ca.crt")
            oci.push(runner, layouts / "agent", vm.AGENT_TAG, f"{reg.host_address}/tink-agent:{vm.AGENT_TAG}",
                     cert_dir=reg.cert_dir)
            oci.push(runner, layouts / "busybox", vm.ACTION_TAG, f"{reg.host_address}/busybox:e2e",
                     cert_dir=reg.cert_dir)
            listing = work / "images.txt"
            listing.write_text(f"{reg.host_address}/tink-agent:{vm.AGENT_TAG} {EMBEDDED_AGENT}\n"
                               f"{reg.host_address}/busybox:e2e {EMBEDDED_ACTION}\n")
            cfg = dataclasses.replace(lab_cfg, embed_images=listing, ssh_authorized_keys=key.with_suffix(".pub"),
                                      out_dir=work / "out")
            entry = pipeline.build_initramfs(cfg, kernel_entry, pipeline.build_tools(cfg))
        finally:
            shutil.rmtree(trust)
    yield SiteImage(kernel_entry / "vmlinuz", entry / "initramfs.cpio.zst", key, other, cmdline, entry)


def banner(port: int) -> bytes | None:
    """The first bytes the guest's port 22 sends through QEMU's forward: b"" when it is closed
    (QEMU accepts on the host, then drops the connection the guest refused), None when nothing
    happened within the timeout (a hung guest is not a closed port)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.settimeout(20)
            return conn.recv(64)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        return None


def ssh(port: int, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-i", str(key), "-p", str(port), *SSH_OPTIONS, "root@127.0.0.1", command],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


@dataclasses.dataclass
class Boot:
    result: vm.Run
    registry_log: str  # every registry's log, the harness's own pushes and probes included
    seen: dict[str, object]  # what the checks saw while the VM was up


def boot(cfg, plan: e2e.Plan, workdir: Path, seen: dict[str, object]) -> Boot | Exception:
    """One VM's run, or why it did not finish: a failure is the failure of that VM's tests only
    (the other VM runs on), with its reason and the harness's diagnostics in the log above."""
    try:
        with e2e.Harness(cfg, plan, workdir=workdir) as harness:
            result = harness.run()
            logs = "\n".join(reg.log_file.read_text(errors="replace") for reg in harness.registries)
    except Exception as exc:  # reported by each test of this VM
        return exc
    print(result.report())
    return Boot(result, logs, seen)


def booted(boots: dict[str, Boot | Exception], name: str) -> Boot:
    found = boots[name]
    if isinstance(found, Exception):
        pytest.fail(f"the {name} VM did not finish: {type(found).__name__}: {found}")
    return found


def checked(fn: Callable[[], object]) -> object:
    """A check run while the VM is up; its exception (an SSH client's timeout, say) becomes what
    the check saw, so the VM is powered off as usual and the test names it."""
    try:
        return fn()
    except (OSError, subprocess.SubprocessError) as exc:
        return exc


def vm_pulls(text: str) -> list[str]:
    """Registry requests made by containerd (the VM's nerdctl and agent), not by the harness."""
    return [line for line in text.splitlines() if "containerd/" in line]


@pytest.fixture(scope="module")
def boots(lab_cfg, kernel_entry, site_image, tmp_path_factory) -> dict[str, Boot | Exception]:
    """The two VMs, side by side (TCG runs each on one host thread): `embedded` boots the site
    image with every registry down; `mirror` boots the test image with the agent's name on
    10.0.2.2:1 and registry_mirrors pointing at the harness registry."""
    shipped = pipeline.build_initramfs(lab_cfg, kernel_entry, pipeline.build_tools(lab_cfg)) / "initramfs.cpio.zst"
    work = tmp_path_factory.mktemp("boots")
    ports = {"embedded": registry.free_port(), "mirror": registry.free_port()}
    seen: dict[str, dict[str, object]] = {"embedded": {}, "mirror": {}}

    def while_up_embedded(harness: e2e.Harness) -> None:
        port, found = ports["embedded"], seen["embedded"]
        found["banner"] = checked(lambda: banner(port))
        found["inside"] = checked(lambda: ssh(port, site_image.key, "cat /run/captainos/embedded-images; "
                                              "ls /usr/share/captainos/embedded; systemctl is-active tink-agent"))
        found["other"] = checked(lambda: ssh(port, site_image.other, "true"))
        found["cmdline"] = checked(lambda: ssh(port, site_image.cmdline, "echo key from the command line"))

        def fingerprint() -> str:
            keyscan = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                                     capture_output=True, text=True, timeout=60, check=False)
            return subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=keyscan.stdout, capture_output=True,
                                  text=True, check=False).stdout
        found["fingerprint"] = checked(fingerprint)

    cmdline_key = site_image.cmdline.with_suffix(".pub").read_text().strip()
    plans = {
        "embedded": e2e.Plan(workflow=WORKFLOWS / "embedded.yaml", kernel=site_image.kernel, initrd=site_image.initrd,
                             registry_delay=math.inf, agent_image=EMBEDDED_AGENT, forward_ssh=ports["embedded"],
                             on_done=while_up_embedded, append=f'"ssh_authorized_keys={cmdline_key}"',
                             mac="52:54:00:12:34:71", timeout=900),
        "mirror": e2e.Plan(workflow=WORKFLOWS / "mirror.yaml", kernel=kernel_entry / "vmlinuz", initrd=shipped,
                           agent_image=f"10.0.2.2:1/{vm.AGENT_REPO}:{vm.AGENT_TAG}",
                           append="registry_mirrors=10.0.2.2:1=https://{registry}", forward_ssh=ports["mirror"],
                           on_done=lambda _: seen["mirror"].update(banner=checked(lambda: banner(ports["mirror"]))),
                           mac="52:54:00:12:34:72", timeout=900),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(boot, lab_cfg, plan, work / name, seen[name]) for name, plan in plans.items()}
        return {name: future.result() for name, future in futures.items()}


def test_embedded_images_run_a_workflow_with_every_registry_down(boots):
    run = booted(boots, "embedded")
    result = run.result
    assert result.state == "SUCCESS", result.report() + "\n" + result.serial[-4000:]
    assert dict(result.reports()) == {"from-the-image": "SUCCESS"}
    # Down from the start: no registry answered anything the VM asked.
    assert vm_pulls(run.registry_log) == [], vm_pulls(run.registry_log)[:3]
    assert "2 embedded image(s) loaded" in result.serial, result.serial[-3000:]


def test_ssh_takes_the_built_in_and_the_command_line_key_and_refuses_another(boots, site_image):
    run = booted(boots, "embedded")
    seen, serial = run.seen, run.result.serial
    assert isinstance(seen["banner"], bytes) and seen["banner"].startswith(b"SSH-2.0-"), seen["banner"]
    inside = seen["inside"]
    assert isinstance(inside, subprocess.CompletedProcess) and inside.returncode == 0, inside
    # The embedded names, the archive deleted after the load (the directory holds only the list).
    assert inside.stdout.split() == [EMBEDDED_AGENT, EMBEDDED_ACTION, "images.list", "active"], inside.stdout
    by_cmdline = seen["cmdline"]
    assert isinstance(by_cmdline, subprocess.CompletedProcess) and by_cmdline.returncode == 0, by_cmdline
    assert by_cmdline.stdout.strip() == "key from the command line"
    other = seen["other"]
    assert isinstance(other, subprocess.CompletedProcess) and other.returncode == 255, other
    # "(publickey)": the only method the server offers; no password is ever asked.
    assert "Permission denied (publickey)" in other.stderr, other.stderr
    # The host key was made at boot and its fingerprint printed on the console.
    fingerprint = re.search(r"SHA256:[A-Za-z0-9+/]+", str(seen["fingerprint"]))
    assert fingerprint, seen["fingerprint"]
    assert f"host key ed25519 {fingerprint.group(0)}" in serial, serial[-3000:]


def test_the_agent_image_comes_through_a_mirror_and_the_agents_action_pulls_do_not(boots):
    run = booted(boots, "mirror")
    result = run.result
    # The agent's name is on 10.0.2.2:1: only the mirror can have served it.
    agent = [line for line in vm_pulls(run.registry_log) if f"/v2/{vm.AGENT_REPO}/manifests/" in line]
    assert agent and all("ns=10.0.2.2%3A1" in line for line in agent), agent
    states = dict(result.reports())  # the last report of each action
    assert states == {"direct": "SUCCESS", "through-the-mirror": "FAILED"}, result.report()
    # The mirror has that image (the direct action pulled it), but the agent never asked it.
    action = [line for line in vm_pulls(run.registry_log) if "/v2/actions/busybox/manifests/" in line]
    assert action and not any("ns=" in line for line in action), action
    failed = [obj for _, obj in result.agent_lines() if "10.0.2.2:1" in json.dumps(obj)]
    assert failed, [obj for _, obj in result.agent_lines()]


def test_the_shipped_configuration_has_no_ssh_server(boots):
    run = booted(boots, "mirror")
    assert run.seen["banner"] == b"", run.seen
