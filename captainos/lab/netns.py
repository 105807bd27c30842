"""A sealed layer-2 network: one network namespace with a bridge and no route out.

Everything the lab serves listens on the bridge address inside the namespace; VMs join the
bridge through tap devices. Commands run inside with `ip netns exec`; Python code that must
open a socket there (the Kubernetes API, readiness checks) runs in a thread switched into the
namespace with setns(2), which moves only that thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from captainos.core import log
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, poll, run

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
PREFIX = "captainos-"
BRIDGE_MAC = "02:77:00:00:00:01"  # locally administered; one per namespace, so labs may share it
BRIDGE6_MAC = "02:77:00:00:00:06"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
T = TypeVar("T")


def exec_argv(netns: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """argv run inside the namespace."""
    return ["ip", "netns", "exec", netns, *[str(a) for a in argv]]


@dataclass(frozen=True)
class NetnsRunner(Runner):
    """Runs each command inside a network namespace (the same process, wrapped by ip netns exec)."""

    netns: str = ""

    def wrap(self, argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str],
             cwd: Path | None = None) -> tuple[list[str], dict[str, str], Path | None]:
        return exec_argv(self.netns, argv), dict(env), cwd


def call_in(netns: str, fn: Callable[[], T]) -> T:
    """fn() in a thread that has entered the namespace; its sockets live there."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise CaptainError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def pids(netns: str) -> list[int]:
    """The processes running in the namespace."""
    if not exists(netns):
        return []
    out = run(["ip", "netns", "pids", netns], capture=True, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


@dataclass(frozen=True)
class Network:
    """The lab's namespace, its bridge and its addresses (a /24; .1 is the lab itself)."""

    name: str  # lab name; the namespace is PREFIX + name
    subnet: str = "10.77.0"
    bridge: str = "br0"
    # IPv6 beside it: the bridge's /64 (router advertisements and DHCPv6 from the lab's dnsmasq),
    # and a second bridge that has IPv6 only (no IPv4 address, no DHCPv4 server).
    prefix6: str = "fd77::"
    only6_bridge: str = "br6"
    only6_prefix: str = "fd78::"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise CaptainError(f"bad lab name {self.name!r}", "use lower-case letters, digits and '-', at most 31")

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    @property
    def address(self) -> str:
        """Where everything the lab serves listens."""
        return f"{self.subnet}.1"

    @property
    def address6(self) -> str:
        """The lab's IPv6 address on its bridge (everything that listens on :: answers there)."""
        return f"{self.prefix6}1"

    @property
    def only6_address(self) -> str:
        """The lab's address on the IPv6-only bridge."""
        return f"{self.only6_prefix}1"

    @property
    def netmask(self) -> str:
        return "255.255.255.0"

    def host(self, index: int) -> str:
        """The address of VM number index (1, 2, ...)."""
        if not 1 <= index <= 200:
            raise CaptainError(f"VM index {index} outside 1-200")
        return f"{self.subnet}.{10 + index}"

    def setup_argvs(self) -> list[list[str]]:
        """The commands that make the namespace: loopback up, a bridge with the lab address."""
        ns = self.netns
        return [
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            # A fixed MAC: a bridge otherwise takes the lowest MAC of its ports, so a VM's tap
            # joining or leaving changed the lab's address under the other VMs' ARP caches,
            # and their packets (syslog, seen in a test run) went to the old one for seconds.
            ["ip", "-n", ns, "link", "add", self.bridge, "address", BRIDGE_MAC, "type", "bridge",
             "forward_delay", "0", "stp_state", "0"],
            ["ip", "-n", ns, "addr", "add", f"{self.address}/24", "dev", self.bridge],
            # nodad: usable at once (no VM is there yet to collide with).
            ["ip", "-n", ns, "-6", "addr", "add", f"{self.address6}/64", "dev", self.bridge, "nodad"],
            ["ip", "-n", ns, "link", "set", self.bridge, "up"],
            ["ip", "-n", ns, "link", "add", self.only6_bridge, "address", BRIDGE6_MAC, "type", "bridge",
             "forward_delay", "0", "stp_state", "0"],
            ["ip", "-n", ns, "-6", "addr", "add", f"{self.only6_address}/64", "dev", self.only6_bridge, "nodad"],
            ["ip", "-n", ns, "link", "set", self.only6_bridge, "up"],
        ]

    def tap_argvs(self, tap: str, bridge: str = "") -> list[list[str]]:
        """A tap device (QEMU's end of a VM's NIC) on the bridge (default: the lab's)."""
        ns = self.netns
        return [
            ["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"],
            ["ip", "-n", ns, "link", "set", tap, "master", bridge or self.bridge],
            ["ip", "-n", ns, "link", "set", tap, "up"],
        ]

    def create(self, runner: Runner) -> None:
        """Make the namespace; refuse when it exists (a lab of that name is up, or was left)."""
        if exists(self.netns):
            raise CaptainError(f"network namespace {self.netns} exists: lab {self.name!r} is already up",
                               f"'./build.py lab down --name {self.name}' removes it")
        try:
            for argv in self.setup_argvs():
                runner.run(argv)
        except BaseException:
            self.destroy(runner)
            raise

    def add_tap(self, runner: Runner, tap: str, bridge: str = "") -> None:
        for argv in self.tap_argvs(tap, bridge):
            runner.run(argv)

    def routes(self) -> str:
        """The namespace's routing tables, IPv4 and IPv6 (the tests check that nothing leads out)."""
        return "".join(run(["ip", "-n", self.netns, *family, "route", "show", "table", "all"], capture=True).stdout
                       for family in ([], ["-6"]))

    def destroy(self, runner: Runner, grace: float = 10.0) -> None:
        """Stop every process left in the namespace (TERM, then KILL), then remove it."""
        remove(self.netns, runner, grace)


def counters(netns: str, table: str, family: str = "ip") -> dict[str, int]:
    """The packet counts of an nftables table's named counters in a namespace."""
    out = run(exec_argv(netns, ["nft", "-j", "list", "counters", "table", family, table]), capture=True).stdout
    found = {}
    for item in json.loads(out).get("nftables", []):
        counter = item.get("counter")
        if counter:
            found[str(counter["name"])] = int(counter["packets"])
    return found


def remove(netns: str, runner: Runner, grace: float = 10.0) -> None:
    """Stop every process left in a namespace (TERM, then KILL), then remove it."""
    if not exists(netns):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids(netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if poll(lambda: True if not pids(netns) else None, grace):
            break
    runner.run(["ip", "netns", "del", netns], check=False)
    if exists(netns):
        log.warn(f"network namespace {netns} could not be removed")


@dataclass(frozen=True)
class SideNetwork:
    """A VM's second network, which is not the lab's: a namespace of its own (its router, DHCP
    and DNS server at .1 of 10.88.<index>.0/24, no route to the lab) joined to a bridge in the
    lab's namespace, on which the VM's second tap sits. The lab's namespace holds no address on
    it, so nothing crosses between the two networks unless the VM forwards it."""

    lab: Network
    index: int  # the VM's number: one side network per VM

    @property
    def netns(self) -> str:
        return f"{self.lab.netns}-o{self.index}"

    @property
    def subnet(self) -> str:
        return f"10.88.{self.index}"

    @property
    def address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def bridge(self) -> str:
        return f"bo{self.index}"

    @property
    def tap(self) -> str:
        return f"to{self.index}"

    def setup_argvs(self) -> list[list[str]]:
        lab, side, veth = self.lab.netns, self.netns, f"vo{self.index}"
        return [
            ["ip", "netns", "add", side],
            ["ip", "-n", side, "link", "set", "lo", "up"],
            ["ip", "-n", lab, "link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0"],
            ["ip", "-n", lab, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", side],
            ["ip", "-n", lab, "link", "set", veth, "master", self.bridge],
            ["ip", "-n", lab, "link", "set", veth, "up"],
            ["ip", "-n", lab, "link", "set", self.bridge, "up"],
            ["ip", "-n", side, "addr", "add", f"{self.address}/24", "dev", "eth0"],
            ["ip", "-n", side, "link", "set", "eth0", "up"],
            *self.lab.tap_argvs(self.tap, self.bridge),
        ]

    def create(self, runner: Runner) -> None:
        if exists(self.netns):
            raise CaptainError(f"network namespace {self.netns} exists: VM {self.index}'s other network is in use")
        try:
            for argv in self.setup_argvs():
                runner.run(argv)
        except BaseException:
            self.destroy(runner)
            raise

    def destroy(self, runner: Runner) -> None:
        remove(self.netns, runner)
        for link in (self.tap, self.bridge):
            runner.run(["ip", "-n", self.lab.netns, "link", "del", link], check=False)
