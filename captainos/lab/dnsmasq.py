"""Debian's dnsmasq in a lab's network namespace: the lab's DNS server (names for the lab's
services, handed to every VM through Smee's DHCP), and the DHCP and DNS server of a VM's
second network (a network of its own, with its own default route and its own answers).

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
class Server:
    """One dnsmasq: where it listens, what it answers, and its files (in workdir)."""

    netns: str
    address: str  # it listens here only (DNS on port 53; DHCP on the interface holding it)
    workdir: Path
    records: dict[str, str] = field(default_factory=dict)  # name -> IPv4 address
    dhcp: Dhcp | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "dnsmasq.log"

    @property
    def lease_file(self) -> Path:
        return self.workdir / "dnsmasq.leases"

    def argv(self) -> list[str]:
        args = ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--no-poll", "--user=root", "--group=root", f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                f"--listen-address={self.address}", "--bind-interfaces", "--log-queries"]
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
                args.append(f"--dhcp-option-force=option:hostname,{d.hostname}")
        return args

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
            if len(fields) >= 3:
                found[fields[1].lower()] = fields[2]
        return found

    def queries(self) -> list[str]:
        """The names it was asked for, in order (its --log-queries lines)."""
        names = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            _, _, rest = line.partition("query[")
            if rest:
                names.append(rest.split("] ", 1)[-1].split(" from ", 1)[0])
        return names
