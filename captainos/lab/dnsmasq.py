"""Debian's dnsmasq in a lab's network namespace: the lab's DNS server (names for the lab's
services, handed to every VM through Smee's DHCP), its IPv6 router advertisements and DHCPv6
(Smee has no DHCPv6), and the DHCP and DNS server of a VM's second network (a network of its
own, with its own default route and its own answers).

Only the options named here are read (no /etc/dnsmasq.conf, /etc/hosts or /etc/resolv.conf):
it answers for its records and forwards nothing, so no query leaves the lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from captainos.core import run
from captainos.core.errors import CaptainError
from captainos.lab import netns

READY = "started, version"  # dnsmasq's first log line, written once its sockets are bound


@dataclass(frozen=True)
class Dhcp:
    """A DHCP service: a pool, and the router, DNS server and host name it hands out."""

    first: str
    last: str
    router: str
    dns: str
    hostname: str = ""  # sent to every client whether asked or not (networkd does not ask)


@dataclass(frozen=True)
class Ipv6:
    """Router advertisements on the interface holding an address of this /64 prefix, and DHCPv6
    there: stateless (SLAAC addresses, DHCPv6 for DNS only) or stateful (addresses leased by
    DHCPv6, none made by SLAAC). The advertisements name the server as router and DNS server."""

    prefix: str  # "fd77::"
    interface: str
    stateful: bool = False

    def argv(self) -> list[str]:
        # Interval 10 s, router lifetime 1800 s: explicit, so the VMs get a default route even
        # though the lab's namespace has none of its own.
        args = [f"--ra-param={self.interface},10,1800"]
        if self.stateful:
            return [*args, f"--dhcp-range={self.prefix}100,{self.prefix}1ff,64,1h"]
        return [*args, f"--dhcp-range={self.prefix},ra-stateless,64,1h"]


@dataclass(frozen=True)
class Server:
    """One dnsmasq: where it listens, what it answers, and its files (in workdir)."""

    netns: str
    address: str  # it listens here (DNS on port 53; DHCP on the interface holding it)
    workdir: Path
    records: dict[str, str] = field(default_factory=dict)  # name -> its addresses, comma-separated
    dhcp: Dhcp | None = None
    also: tuple[str, ...] = ()  # more addresses it listens on
    ipv6: tuple[Ipv6, ...] = ()  # each prefix's interface holds one of also

    @property
    def log_file(self) -> Path:
        return self.workdir / "dnsmasq.log"

    @property
    def lease_file(self) -> Path:
        return self.workdir / "dnsmasq.leases"

    def argv(self) -> list[str]:
        args = ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--no-poll", "--user=root", "--group=root", f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                *[f"--listen-address={a}" for a in (self.address, *self.also)], "--log-queries"]
        # Router advertisements go out only on interfaces named by --interface (a listen
        # address is not enough: none were sent), and --bind-dynamic follows a bridge whose
        # link-local address comes only when its first VM joins.
        if self.ipv6:
            args += [*(f"--interface={each.interface}" for each in self.ipv6), "--bind-dynamic"]
        else:
            args.append("--bind-interfaces")
        # --local: the names are its own, so a question it has no record for (AAAA) gets "no
        # such data" rather than "refused", which sends a resolver on to the next server.
        for name, address in sorted(self.records.items()):
            args += [f"--host-record={name},{address}", f"--local=/{name}/"]
        if self.dhcp is not None:
            d = self.dhcp
            args += [f"--dhcp-range={d.first},{d.last},255.255.255.0,12h", f"--dhcp-option=option:router,{d.router}",
                     f"--dhcp-option=option:dns-server,{d.dns}", f"--dhcp-leasefile={self.lease_file}",
                     "--dhcp-authoritative", "--log-dhcp"]
            if d.hostname:
                # Option 12 by number: dnsmasq has no name for it.
                args.append(f"--dhcp-option-force=12,{d.hostname}")
        if self.ipv6:
            args += ["--enable-ra", f"--dhcp-leasefile={self.lease_file}", "--log-dhcp"]
            for each in self.ipv6:
                args += each.argv()
        return list(dict.fromkeys(args))

    def start(self) -> run.Process:
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = run.spawn(netns.exec_argv(self.netns, self.argv()), self.log_file, truncate=True)
        if run.await_ready(proc, lambda: READY in self.log_file.read_text(errors="replace"), 15) != "ready":
            run.stop(proc)
            raise CaptainError(f"dnsmasq did not start in {self.netns}; see {self.log_file}")
        return proc

    def leases(self) -> dict[str, str]:
        """MAC -> the IPv4 address leased (dnsmasq's lease file: expiry, MAC, address, name, id)."""
        if not self.lease_file.is_file():
            return {}
        found = {}
        for line in self.lease_file.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and ":" not in fields[2]:  # DHCPv6 lines name no MAC
                found[fields[1].lower()] = fields[2]
        return found

    def addresses6(self) -> list[str]:
        """The IPv6 addresses DHCPv6 leased (lease file lines: expiry, IAID, address, name, DUID)."""
        if not self.lease_file.is_file():
            return []
        return [f[2] for f in (line.split() for line in self.lease_file.read_text().splitlines())
                if len(f) >= 3 and ":" in f[2] and f[0] != "duid"]

    def queries(self) -> list[str]:
        """The names it was asked for, in order (its --log-queries lines)."""
        names = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            _, _, rest = line.partition("query[")
            if rest:
                names.append(rest.split("] ", 1)[-1].split(" from ", 1)[0])
        return names
