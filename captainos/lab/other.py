"""A VM's second network in the lab: the proof that the boot NIC comes first, and that the
machine routes nothing from one of its networks to the other.

The network (netns.SideNetwork) has its own dnsmasq handing out a lease with a default route,
a DNS server that answers for the lab's server name with an address of its own (a decoy) and a
host name of its own. The VM's NIC on it is first in PCI order, so the kernel names it first
and DHCP may well answer it first. If the VM took that network's route, DNS or host name, the
agent would dial the decoy, its traffic would cross the other router (counted here), or its
syslog would carry the wrong name. At the end, a host on the other network routes packets for
the lab's network through the VM: none may arrive in the lab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captainos.core import log, run
from captainos.core.run import Runner
from captainos.lab import dnsmasq, netns

HOSTNAME = "other-network"  # what the other DHCP server names the machine
KINDS = ("dhcp", "silent")  # a network whose dnsmasq answers, one where nothing does
WATCH = "captainos_watch"  # the nftables table of counters, in both namespaces


def side_rules(side: netns.SideNetwork) -> str:
    """Counters on the other network's router: TCP and syslog from the VM's side of it."""
    net = f"{side.subnet}.0/24"
    return (f"table ip {WATCH} {{\n  counter tcp_packets {{}}\n  counter syslog_packets {{}}\n"
            f"  chain pre {{\n    type filter hook prerouting priority -300; policy accept;\n"
            f"    ip saddr {net} ip protocol tcp counter name \"tcp_packets\"\n"
            f"    ip saddr {net} udp dport 514 counter name \"syslog_packets\"\n  }}\n}}\n")


def lab_rules(side: netns.SideNetwork) -> str:
    """A counter in the lab's namespace: packets from the other network arriving on the lab's
    bridge (only the VM could have forwarded them there). The bridge name matters: where
    br_netfilter is loaded, frames the other network's own bridge (also in this namespace)
    carries pass the IP hooks too."""
    return (f"table ip {WATCH}_o{side.index} {{\n  counter crossed {{}}\n"
            f"  chain pre {{\n    type filter hook prerouting priority -300; policy accept;\n"
            f"    iifname \"{side.lab.bridge}\" ip saddr {side.subnet}.0/24 counter name \"crossed\"\n  }}\n}}\n")


@dataclass
class Other:
    side: netns.SideNetwork
    dns: dnsmasq.Server
    answer: bool = True  # False: no dnsmasq (the VM's DHCP there never gets an answer)
    proc: run.Process | None = None

    @classmethod
    def make(cls, lab: netns.Network, index: int, workdir: Path, names: tuple[str, ...],
             answer: bool = True) -> Other:
        side = netns.SideNetwork(lab, index)
        dhcp = dnsmasq.Dhcp(f"{side.subnet}.100", f"{side.subnet}.150", router=side.address, dns=side.address,
                            hostname=HOSTNAME)
        server = dnsmasq.Server(side.netns, side.address, workdir / "other-network",
                                records=dict.fromkeys(names, side.address), dhcp=dhcp)
        return cls(side, server, answer)

    def up(self, runner: Runner) -> None:
        self.side.create(runner)
        run.run(netns.exec_argv(self.side.netns, ["nft", "-f", "-"]), input_text=side_rules(self.side))
        run.run(netns.exec_argv(self.side.lab.netns, ["nft", "-f", "-"]), input_text=lab_rules(self.side))
        if self.answer:
            self.proc = self.dns.start()
        served = f"DHCP and DNS on {self.side.address}" if self.answer else "nothing answers there"
        log.info(f"    other network {self.side.subnet}.0/24 ({self.side.netns}): {served}")

    def qemu_args(self, mac: str) -> list[str]:
        """The VM's NIC on this network: no option ROM (it never netboots), no boot index."""
        return ["-netdev", f"tap,id=net1,ifname={self.side.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net1,mac={mac},romfile="]

    def probe(self, mac: str) -> dict[str, Any]:
        """With the VM still up: where its traffic went, and whether it forwards from this
        network to the lab's (a host here routes the lab's subnet through the VM)."""
        found: dict[str, Any] = {"lease": self.dns.leases().get(mac.lower(), ""), "queries": self.dns.queries()}
        found.update(netns.counters(self.side.netns, WATCH))
        vm = found["lease"]
        if vm:
            ns, lab = self.side.netns, self.side.lab
            run.run(["ip", "-n", ns, "route", "add", f"{lab.subnet}.0/24", "via", vm])
            ping = ["busybox", "ping", "-c", "3", "-W", "2"]
            found["vm answers"] = run.run(netns.exec_argv(ns, [*ping, vm]), check=False, capture=True).returncode == 0
            found["lab answers"] = run.run(netns.exec_argv(ns, [*ping, lab.address]), check=False,
                                           capture=True).returncode == 0
        found["crossed"] = netns.counters(self.side.lab.netns, f"{WATCH}_o{self.side.index}")["crossed"]
        return found

    def down(self, runner: Runner) -> None:
        run.stop(self.proc)
        run.run(netns.exec_argv(self.side.lab.netns, ["nft", "delete", "table", "ip", f"{WATCH}_o{self.side.index}"]),
                check=False)
        self.side.destroy(runner)
