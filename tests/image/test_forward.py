"""forward.nft, the image's forwarding policy, in network namespaces of this test's own: a
"machine" with two NICs on two networks and a container bridge (cni0) with one container
behind it. The machine forwards for the container, never between its NICs.
captainos-forward.service loads the same file at boot; the self-test checks it is there."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "image/mkosi.extra/usr/lib/captainos/forward.nft"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("nft", "ip", "busybox")),
                       reason="needs nft, ip and busybox (./build.py setup)"),
]


class Net:
    """Namespaces <prefix>m (the machine), <prefix>a and <prefix>b (a network on each NIC),
    <prefix>c (a container on the machine's cni0)."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix
        self.names = [prefix + n for n in "mabc"]

    def sh(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.p + ns, *argv], capture_output=True, text=True,
                              check=check, timeout=30)

    def up(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        m = self.p + "m"
        for side, subnet in (("a", "10.71.1"), ("b", "10.71.2"), ("c", "172.17.0")):
            subprocess.run(["ip", "link", "add", f"{self.p}{side}0", "netns", self.p + side, "type", "veth",
                            "peer", "name", f"m{side}", "netns", m], check=True)
            host = f"{subnet}.2/24" if side != "c" else "172.17.0.2/23"
            self.sh(side, "ip", "addr", "add", host, "dev", f"{self.p}{side}0")
            self.sh(side, "ip", "link", "set", "dev", f"{self.p}{side}0", "up")
            self.sh(side, "ip", "link", "set", "dev", "lo", "up")
            self.sh(side, "ip", "route", "add", "default", "via", f"{subnet}.1")
        self.sh("m", "ip", "link", "add", "cni0", "type", "bridge")
        self.sh("m", "ip", "link", "set", "dev", "mc", "master", "cni0")
        self.sh("m", "ip", "addr", "add", "172.17.0.1/23", "dev", "cni0")
        self.sh("m", "ip", "addr", "add", "10.71.1.1/24", "dev", "ma")
        self.sh("m", "ip", "addr", "add", "10.71.2.1/24", "dev", "mb")
        for link in ("ma", "mb", "mc", "cni0", "lo"):
            self.sh("m", "ip", "link", "set", "dev", link, "up")  # "dev": "ma" alone reads as "master"
        self.sh("m", "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def down(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)

    def ping(self, ns: str, address: str) -> bool:
        return self.sh(ns, "busybox", "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


@pytest.fixture
def net() -> Iterator[Net]:
    made = Net(f"cfw{os.getpid() % 10000}")
    try:
        made.up()
        yield made
    finally:
        made.down()


def test_without_the_policy_the_machine_routes_between_its_nics(net):
    """The control: what the policy must stop does happen without it."""
    assert net.ping("a", "10.71.2.2")


def test_the_machine_forwards_for_containers_and_never_between_its_nics(net):
    net.sh("m", "nft", "-f", str(RULES))
    net.sh("m", "nft", "-f", str(RULES))  # loaded again (a restart): the same one table, no error
    assert net.sh("m", "nft", "list", "tables").stdout.split().count("captainos") == 1
    assert not net.ping("a", "10.71.2.2"), "network a reached network b through the machine"
    assert not net.ping("b", "10.71.1.2"), "network b reached network a through the machine"
    assert net.ping("c", "10.71.1.2") and net.ping("c", "10.71.2.2"), "the container lost its network"
    assert not net.ping("a", "172.17.0.2"), "a network reached a container it was not published to"
    # A port published the way the CNI portmap plugin does it (DNAT on the machine's address).
    net.sh("m", "nft", "add table ip pm; add chain ip pm pre { type nat hook prerouting priority dstnat; }; "
                       "add rule ip pm pre ip daddr 10.71.1.1 icmp type echo-request dnat to 172.17.0.2")
    assert net.ping("a", "10.71.1.1"), "a published container did not answer"
