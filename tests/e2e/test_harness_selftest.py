"""The harness itself, with a real VM and the real agent but without the CaptainOS image.

The guest is a Debian kernel with a throwaway busybox initramfs whose /init configures the
NIC by hand, forwards its log with busybox syslogd to the harness, and runs the real tink-agent
(copied in, not pulled) against the harness's workflow server. Without containerd the action
cannot start, so the agent reports TIMEOUT: enough to check every moving part of the harness
(e2e.Harness: QEMU user networking to 10.0.2.2, gRPC, syslog, serial timestamps, timeline,
power-off path).
"""

from __future__ import annotations

import json
import lzma
import os
import stat
import textwrap
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.run import Runner
from captainos.lab import agent, e2e
from captainos.stages import cpio

pytestmark = pytest.mark.integration

INIT = r"""#!/bin/sh
# PID 1 of the self-test guest: network, remote syslog, then the real agent.
set -eu
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run /var/log
for mod in failover net_failover virtio_net; do insmod "/lib/$mod.ko"; done
hostname selftest-vm
arg() {  # value of a kernel command line parameter
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}" ;; esac
    done
}
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0   # QEMU user networking's fixed guest address
ip route add default via 10.0.2.2
syslogd -R "$(arg syslog_host):$(arg syslog_port)" -O /var/log/messages
echo "SELFTEST: network up"
: > /not-a-socket   # containerd is absent: every pull fails at once
/tink-agent --id "$(arg worker_id)" --runtime containerd --grpc-server "$(arg grpc_authority)" \
    --containerd-socket /not-a-socket 2>&1 | while IFS= read -r line; do
    echo "$line"                          # to the serial console
    logger -t tink-agent -- "$line"       # and to the remote syslog
done
"""

WORKFLOW = """
name: selftest
worker: "{{ worker_id }}"
tasks:
  - name: only
    actions:
      - {name: cannot-pull, image: "{{ action_image }}", timeout: 5, command: [/bin/true]}
      - {name: never, image: "{{ action_image }}", timeout: 5}
"""


def selftest_initramfs(dest: Path, kernel_entry: Path, agent_binary: Path) -> Path:
    version = json.loads((kernel_entry / "kernel.json").read_text())["version"]
    mods = kernel_entry / "modules" / "usr" / "lib" / "modules" / version / "kernel"
    entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in
                                             ("bin", "sbin", "lib", "proc", "sys", "dev", "tmp", "etc")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes()))
    applets = ("sh", "mount", "insmod", "hostname", "ip", "syslogd", "logger", "mkdir", "echo", "cat")
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in applets]
    for name, rel in (("failover", "net/core/failover.ko.xz"), ("net_failover", "drivers/net/net_failover.ko.xz"),
                      ("virtio_net", "drivers/net/virtio_net.ko.xz")):
        entries.append((f"lib/{name}.ko", stat.S_IFREG | 0o644, lzma.decompress((mods / rel).read_bytes())))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    entries.append(("tink-agent", stat.S_IFREG | 0o755, agent_binary.read_bytes()))
    dest.write_bytes(cpio.write(entries))
    return dest


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="needs busybox-static")
def test_the_harness_against_a_busybox_guest_running_the_real_agent(tmp_path):
    from captainos.stages import pipeline

    env = {"KERNEL_SOURCE": os.environ.get("KERNEL_SOURCE", "debian-image"), "QEMU_ACCEL": "tcg",
           "QEMU_MEM": "1G", "OUT_DIR": str(tmp_path / "out")}
    if "CAPTAINOS_CACHE" in os.environ:
        env["CAPTAINOS_CACHE"] = os.environ["CAPTAINOS_CACHE"]
    cfg = config.load(env=env)
    kernel_entry = pipeline.build_kernel(cfg)
    initrd = selftest_initramfs(tmp_path / "selftest.cpio", kernel_entry,
                                agent.build(cfg, Runner()) / agent.BINARY)
    workflow_file = tmp_path / "selftest.yaml"
    workflow_file.write_text(textwrap.dedent(WORKFLOW))
    plan = e2e.Plan(workflow=workflow_file, kernel=kernel_entry / "vmlinuz", initrd=initrd, timeout=300,
                    settle=3, poweroff_timeout=3, long_poll=5)
    with e2e.Harness(cfg, plan, workdir=tmp_path / "harness") as harness:
        result = harness.run()
        print(result.report())
        assert result.state == "TIMEOUT", harness.diagnostics()
        assert result.reports() == [("cannot-pull", "RUNNING"), ("cannot-pull", "TIMEOUT")]
        assert result.served() == ["cannot-pull"]
        served = next(r for r in result.records if r["kind"] == "served")
        assert served["macs"] == [plan.mac], "the agent saw the VM's NIC"
        assert any("SELFTEST: network up" in line for _, line in result.console)
        # The agent's log reached the receiver through the guest's syslogd.
        via_syslog = [m for m in result.syslog if '"msg":"received action"' in m.msg]
        assert via_syslog and via_syslog[0].app == "tink-agent", [m.raw for m in result.syslog][:5]
        marks = dict(result.timeline)
        for label in ("kernel started", "network up", "agent started", "first action received", "workflow done"):
            assert marks[label] is not None, result.report()
        assert marks["kernel started"] <= marks["agent started"] <= marks["first action received"] \
            <= marks["workflow done"], result.report()
        assert harness.guest is not None and harness.guest.proc is not None and harness.guest.proc.poll() is not None
