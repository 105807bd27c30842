"""The real-Tinkerbell lab: a sealed network, the real server, and VMs that netboot from it.

    with Lab(cfg, artifacts=Path("out")) as lab:           # or Lab.attach() to a `lab up`
        result = lab.provision(Provision(workflow=Path("examples/workflow.yaml")))
        print(result.report())

`up()` makes the network namespace (a bridge, no route out), starts a TLS registry holding the
real tink-agent and a busybox action image, an HTTP server for the artifacts (Smee's OSIE URL)
and the real Tinkerbell (Smee's DHCP/TFTP/iPXE/ISO/syslog, tink server, the controller, etcd,
kube-apiserver), all on the bridge address. `provision()` makes the Hardware, Template and
Workflow through the Kubernetes API, powers a VM on with no kernel given (BIOS or UEFI
netboot, or the ISO as Smee patched it), follows the Workflow to its final state, and returns
what happened as a vm.Run (the result the `qemu-test --workflow` harness returns too): the
Workflow object, the events, Smee's log, the syslog Smee received, the consoles and a
timeline. Everything runs in the namespace; `down()` stops all of it.

The registry uses the harness CA, which the image must trust: build it with
`--extra-ca-certs <cache>/e2e-ca/ca.pem` (the lab says so when the artifacts are missing).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from captainos.core import cache, log, run
from captainos.core.config import Accel, Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import (
    agent,
    dnsmasq,
    hub,
    kube,
    netns,
    oci,
    other,
    qemu,
    registry,
    syslogd,
    tinkerbell,
    vm,
    workflow,
)
from captainos.lab import chart as helm_chart
from captainos.stages import artifacts, cpio

REGISTRY_PORT = 5000
AUTH_REGISTRY_PORT = 5001
ARTIFACT_PORT = 8080
OVMF = Path("/usr/share/ovmf/OVMF.fd")
AGENT_IMAGE_PATH = f"{vm.AGENT_REPO}:{vm.AGENT_TAG}"
# direct: QEMU loads the kernel and initramfs itself, with a command line made as Smee makes
# it (the IPv6-only network has no DHCPv4, so nothing could netboot there).
BOOT_MODES = ("bios", "uefi", "iso", "direct")
# A VM's IPv6: "netboot-then-ipv6" netboots over IPv4 and then names Tinkerbell, the registry
# and syslog by the lab's IPv6 address only (extra kernel parameters, later words win);
# "ipv6-only" boots directly on the IPv6-only bridge and names them by SERVER_NAME6 only.
IPV6_KINDS = ("netboot-then-ipv6", "ipv6-only")
# The test profile's self-test would power the VM off; an image without that profile ignores it.
LAB_KERNEL_PARAMS = vm.TEST_PROFILE_ARGS
FIRMWARE_START = re.compile(r"SeaBIOS \(version|BdsDxe: loading|UEFI Interactive Shell|EDK II")
KERNEL_START = re.compile(r"^\[\s*0\.000000\] Linux version")
TRUST_STORE = "etc/ssl/certs/ca-certificates.crt"  # in the image: update-ca-certificates's bundle
CONSOLE_NOTE = re.compile(r"captainos: [\w.@-]+: ")  # what CaptainOS's programs tell the console's operator
# The lab's DNS server (dnsmasq on the lab address; Smee's DHCP hands it to every VM) knows
# Tinkerbell by this name: grpc_authority= and syslog_host= may name it instead of the address.
SERVER_NAME = "tinkerbell.lab"
# The lab's IPv6 address by name (AAAA only). SERVER_NAME stays IPv4 only: with both records,
# glibc's default order puts a ULA (fd77::1) before IPv4, and the IPv4 scenarios' syslog, sent
# by name, would go past Smee's IPv4-only receiver.
SERVER_NAME6 = "tinkerbell6.lab"
SYSLOG_PORT = 514
WATCH6 = "captainos_v6"  # the nftables table (family inet) of an IPv6 scenario's counters


def pem_bodies(pem: bytes) -> list[bytes]:
    """The base64 bodies of the certificates in a PEM text, each on one line."""
    bodies = re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    return [b"".join(body.split()) for body in bodies]


def trusts(initramfs: Path, ca_pem: bytes) -> bool:
    """The image's trust store (`ca-certificates.crt`, what Go and containerd read) holds every
    certificate of ca_pem."""
    wanted = pem_bodies(ca_pem)
    for member in cpio.members(cpio.decompress(initramfs)):
        if member.is_file and member.name == TRUST_STORE:
            store = set(pem_bodies(member.data))
            return bool(wanted) and all(body in store for body in wanted)
    return False


def lab_dir(cfg: Config, name: str) -> Path:
    return cfg.cache_dir / "lab" / name


@dataclass
class State:
    """What `lab up` leaves for `lab run` and `lab down` (lab.json in the lab directory)."""

    name: str
    root: str
    netns: str
    address: str
    artifacts: str
    kubeconfig: str
    registry: str
    auth_registry: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    iso_url: str = ""
    hub: bool = False  # the hub actions are in the registry and the hub disk image is served
    chart_url: str = ""  # the Helm chart's nginx serving the published image (empty: not started)

    def save(self, path: Path) -> None:
        cache.atomic_write(path, json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> State:
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class Provision:
    """One VM provisioned end to end."""

    workflow: Path
    boot: str = "bios"  # bios (SeaBIOS + the NIC's iPXE), uefi (OVMF), iso (Smee-patched ISO under OVMF)
    index: int = 1  # VM number: its MAC, address and tap device
    timeout: float = 900.0  # power-on to the workflow's final state
    append: tuple[str, ...] = ()  # extra kernel parameters (the Hardware's osie.kernelParams; netboot only)
    disk_size: str = "64M"
    settle: float = 8.0  # keep the VM up this long after the end, for the last logs to arrive
    restart: str = ""  # the workflow ends in a restart request: "reboot" or "kexec"; wait until it is seen
    restart_timeout: float = 300.0
    after_restart: str = ""  # a regex: after the restart, wait (restart_timeout) for an OS console line matching it
    registry_delay: float = 0.0  # stop the registries before power-on and start them this much later
    mem: str = ""  # guest memory (QEMU's -m); empty: the config's qemu_mem
    give_up: tuple[str, ...] = ()  # regexes: a line of the OS console matching one ends the run at once
    osie: str = ""  # "chart": the Hardware's OSIE URL is the Helm chart's nginx (else Smee's default)
    # A second NIC, first in PCI order (the kernel names it first), on a network of its own
    # (netns.SideNetwork): "dhcp", whose DHCP hands out another default route, another DNS
    # server that knows SERVER_NAME as its own router, and another host name; "silent", where
    # nothing answers (a NIC whose DHCP never comes). Empty: one NIC.
    other_network: str = ""
    ipv6: str = ""  # one of IPV6_KINDS; empty: the VM gets IPv6 as any other (SLAAC on the lab's bridge)

    @property
    def mac(self) -> str:
        return f"52:54:00:77:00:{self.index:02x}"

    @property
    def other_mac(self) -> str:
        return f"52:54:00:88:00:{self.index:02x}"


def smee_syslog(records: list[dict[str, Any]], received: list[float]) -> list[syslogd.Message]:
    """The syslog messages Smee's receiver logged, as Messages (received: the record's time)."""
    found = []
    for rec, when in zip(records, received, strict=True):
        doc = rec.get("syslog")
        if rec.get("msg") != "syslog message received" or not isinstance(doc, dict):
            continue
        msg = doc.get("msg", "")
        text = json.dumps(msg) if isinstance(msg, dict) else str(msg)
        found.append(syslogd.Message(
            facility=0, severity=6, version=1, timestamp=str(doc.get("timestamp", "")),
            hostname=str(doc.get("hostname", "")), app=str(doc.get("app-name", "")),
            procid=str(doc.get("procid", "")), msgid=str(doc.get("msgid", "")), structured_data="",
            msg=text, raw=json.dumps(doc), peer=str(doc.get("host", "")), received=when))
    return found


def watch6_rules(mac: str, table: str) -> str:
    """Counters in the lab's namespace of what one VM (by its MAC) sends to tink server's gRPC,
    the registry and syslog, by IP version."""
    services = (("grpc", "tcp", tinkerbell.GRPC_PORT), ("registry", "tcp", REGISTRY_PORT),
                ("syslog", "udp", SYSLOG_PORT))
    names = [f"{name}{v}" for name, _, _ in services for v in (4, 6)]
    rules = [f"    ether saddr {mac.lower()} meta nfproto ipv{v} {proto} dport {port} counter name \"{name}{v}\""
             for name, proto, port in services for v in (4, 6)]
    return (f"table inet {table} {{\n" + "".join(f"  counter {n} {{}}\n" for n in names)
            + "  chain input {\n    type filter hook input priority -300; policy accept;\n"
            + "\n".join(rules) + "\n  }\n}\n")


def neighbours6(ns: str, mac: str) -> list[str]:
    """The IPv6 addresses the lab's namespace has seen this MAC use (its neighbour table)."""
    found = []
    for line in run.run(["ip", "-n", ns, "-6", "neigh", "show"], capture=True).stdout.splitlines():
        fields = line.split()
        if "lladdr" in fields and fields[fields.index("lladdr") + 1].lower() == mac.lower():
            found.append(fields[0])
    return sorted(set(found))


def direct_cmdline(*, mac: str, grpc: str, syslog_host: str, agent_image: str) -> str:
    """A kernel command line as Smee's netboot script makes it (kernel-cmdline.md), for a VM that
    boots its kernel directly."""
    return " ".join([f"facility= syslog_host={syslog_host} grpc_authority={grpc} tinkerbell_tls=false",
                     f"tinkerbell_insecure_tls=false worker_id={mac} hw_addr={mac} console=tty0",
                     f"console=ttyS1,115200 tink_worker_image={agent_image}", *LAB_KERNEL_PARAMS])


class Lab:
    """The lab; a context manager that brings it up and always takes it down."""

    def __init__(self, cfg: Config, *, artifacts_dir: Path | None = None, name: str = "",
                 root: Path | None = None, runner: Runner | None = None, auth: bool = False,
                 iso: bool = True, chart: bool = False) -> None:
        if cfg.arch is not Arch.AMD64:
            raise CaptainError("the lab boots amd64 VMs only", "use --arch amd64")
        self.cfg = cfg
        self.name = name or f"t{secrets.token_hex(3)}"
        self.network = netns.Network(self.name)
        self.root = root or lab_dir(cfg, self.name)
        self.artifacts = (artifacts_dir or cfg.out_dir).resolve()
        self.runner = runner or Runner()
        self.inside = netns.NetnsRunner(netns=self.network.netns)
        self.auth = auth
        self.iso = iso
        self.chart = chart
        self.file_server: helm_chart.FileServer | None = None
        self.password = secrets.token_urlsafe(18)
        self.username = "captain"
        self.registries: list[registry.Registry] = []
        self.server: tinkerbell.Server | None = None
        self.http: run.Process | None = None
        self.dns: run.Process | None = None
        self.dns_server: dnsmasq.Server | None = None
        self.relay: run.Process | None = None  # tink server's gRPC on the lab's IPv6 addresses
        self.syslog6: run.Process | None = None  # syslog on the lab's IPv6 addresses
        self.client: kube.Client | None = None
        self.state: State | None = None
        self._owner = True  # this object made the lab (and takes it down)
        self._accel: Accel | None = None

    @property
    def chart_work(self) -> Path:
        """The Helm chart file server's directory (its layout, containerd, nginx's root)."""
        return self.root / "chart"

    # --- bring up --------------------------------------------------------------------------
    def check_artifacts(self, ca: registry.CA) -> None:
        """The image is there and trusts the lab's CA: an image that does not would boot and
        wait, every action PENDING, until the timeout."""
        names = artifacts.smee_links(self.cfg.arch)
        missing = [n for n in names if not (self.artifacts / n).is_file()]
        build = f"./build.py --out-dir {self.artifacts} --extra-ca-certs {ca.cert}"
        if missing:
            raise CaptainError(f"{self.artifacts} has no {', '.join(missing)}", f"build the image first: {build}")
        if not trusts(self.artifacts / artifacts.initramfs_name(self.cfg.arch), ca.cert.read_bytes()):
            raise CaptainError(f"the image in {self.artifacts} does not trust the lab's CA {ca.cert}: its agent "
                               "could not pull from the lab's registry", f"build it with the CA: {build}")

    def up(self) -> Lab:
        ca = registry.ensure_ca(self.cfg.cache_dir, self.runner)
        self.check_artifacts(ca)
        state_file = self.root / "lab.json"
        if netns.exists(self.network.netns) or state_file.exists():
            raise CaptainError(f"lab {self.name!r} is already up ({self.network.netns})",
                               f"'./build.py lab down --name {self.name}' takes it down")
        binary = agent.build(self.cfg, self.runner, program=agent.TINKERBELL) / agent.TINKERBELL.binary
        layouts = vm.images(self.cfg, self.runner)
        hub_entries = self._hub(ca)
        if self.root.exists():
            cache.remove(self.root)
        self.root.mkdir(parents=True)
        addr = self.network.address
        log.info(f"==> lab {self.name}: namespace {self.network.netns}, bridge {self.network.bridge} {addr}/24")
        self.network.create(self.runner)
        try:
            self._start(binary, ca, layouts, hub_entries)
        except BaseException:
            self.down()
            raise
        return self

    def _hub(self, ca: registry.CA) -> tuple[Path, Path] | None:
        """(action images, disk image) entries of the hub template: built when the source is
        given, else taken from the cache when an earlier lab built them."""
        images = hub.images(self.cfg, self.runner, ca.cert)
        if images is None:
            log.info("    hub actions: not built (no --hub-actions-src); templates naming them are refused")
            return None
        links = artifacts.smee_links(self.cfg.arch)
        kernel, initramfs = (self.artifacts / name for name in links)
        disk = hub.disk_image(self.cfg, self.runner, kernel, initramfs, vm.action_busybox(self.cfg, self.runner))
        return images, disk

    def _start(self, binary: Path, ca: registry.CA, layouts: Path, hub_entries: tuple[Path, Path] | None) -> None:
        addr = self.network.address
        probe = lambda fn: netns.call_in(self.network.netns, fn)  # noqa: E731
        net = self.network
        also = (net.address6, net.only6_address, SERVER_NAME, SERVER_NAME6)  # what the certificates name
        reg = registry.Registry(ca, self.root, "registry", runner=self.inside, port=REGISTRY_PORT,
                                lab_address=addr, also=also, call_in=probe).start()
        self.registries.append(reg)
        oci.push(self.inside, layouts / "busybox", vm.ACTION_TAG, f"{reg.host_address}/{vm.ACTION_REPO}:"
                 f"{vm.ACTION_TAG}", cert_dir=reg.cert_dir)
        oci.push(self.inside, layouts / "agent", vm.AGENT_TAG, f"{reg.host_address}/{AGENT_IMAGE_PATH}",
                 cert_dir=reg.cert_dir)
        if hub_entries is not None:
            hub.push(self.inside, *hub_entries, reg.host_address, reg.cert_dir)
        auth_address = ""
        if self.auth:
            creds = oci.Credentials(self.username, self.password)
            auth = registry.Registry(ca, self.root, "registry-auth", creds=creds, runner=self.inside,
                                     port=AUTH_REGISTRY_PORT, lab_address=addr, also=also, call_in=probe).start()
            self.registries.append(auth)
            oci.push(self.inside, layouts / "agent", vm.AGENT_TAG, f"{auth.host_address}/{vm.AGENT_REPO}:latest",
                     cert_dir=auth.cert_dir, creds=creds)
            auth_address = auth.host_address
        self.http = self._serve_artifacts(hub_entries[1] if hub_entries else None)
        # DNS for both names; router advertisements and DHCPv6 on both bridges: SLAAC with
        # stateless DHCPv6 beside Smee's DHCPv4 on the lab's bridge, DHCPv6 leases on the
        # IPv6-only one.
        self.dns_server = dnsmasq.Server(
            net.netns, addr, self.root / "dns", records={SERVER_NAME: addr, SERVER_NAME6: net.address6},
            also=(net.address6, net.only6_address),
            ipv6=(dnsmasq.Ipv6(net.prefix6, net.bridge),
                  dnsmasq.Ipv6(net.only6_prefix, net.only6_bridge, stateful=True)))
        self.dns = self.dns_server.start()
        self.relay = self._python_in_netns("relay", ["--port", str(tinkerbell.GRPC_PORT), "--to",
                                                     f"{addr}:{tinkerbell.GRPC_PORT}"], "relaying")
        self.syslog6 = self._python_in_netns("syslogd", ["--bind", "::", "--port", str(SYSLOG_PORT), "--out",
                                                         str(self.root / "syslog6.jsonl")], "listening")
        if self.chart:
            from captainos.stages import pipeline

            tools_bin = pipeline.build_tools(self.cfg) / "tree" / "usr" / "bin"
            self.file_server = helm_chart.FileServer(self.cfg, self.runner, self.chart_work, self.network.netns,
                                                addr).start(self.artifacts, reg.host_address, reg.cert_dir, tools_bin)
        certs = tinkerbell.make_certs(self.root / "pki", addr, tinkerbell.API_PORT, self.runner)
        self.client = kube.Client(self.network.netns, addr, tinkerbell.API_PORT, certs.ca, certs.admin,
                                  certs.admin_key)
        osie = f"http://{addr}:{ARTIFACT_PORT}"
        iso_url = f"{osie}/{artifacts.iso_name(self.cfg.arch)}" if self.iso else ""
        cmd = tinkerbell.argv(binary, certs=certs, address=addr, state=self.root, osie_url=osie, iso_url=iso_url)
        # As an operator does (the Helm chart's extra kernel args): Smee appends these to every
        # command line it hands out, the netboot script's and the patched ISO's alike. Through the
        # environment, not the argv that `ps` shows.
        env = {tinkerbell.EXTRA_ARGS_ENV: " ".join(self.extra_kernel_args(reg.host_address, auth_address))}
        log.info(f"    starting Tinkerbell ({binary.name}, embedded etcd and kube-apiserver)")
        self.server = tinkerbell.Server(cmd, self.network.netns, self.root / "tinkerbell.log", self.client,
                                        env=env).start()
        pids = {"tinkerbell": self.server.proc.pid if self.server.proc else 0,
                "http": self.http.pid, "dns": self.dns.pid, "relay": self.relay.pid,
                "syslog6": self.syslog6.pid, **{r.name: r.proc.pid for r in self.registries if r.proc}}
        self.state = State(self.name, str(self.root), self.network.netns, addr, str(self.artifacts),
                           str(certs.kubeconfig), reg.host_address, auth_address, pids, iso_url,
                           hub=hub_entries is not None,
                           chart_url=self.file_server.url if self.file_server else "")
        self.state.save(self.root / "lab.json")

    def _serve_artifacts(self, hub_disk: Path | None) -> run.Process:
        extra = ["--extra", f"hub={hub_disk}"] if hub_disk else []
        return self._python_in_netns(
            "artifacts_server", ["--bind", self.network.address, "--port", str(ARTIFACT_PORT),
                                 "--directory", str(self.artifacts), *extra],
            lambda: tinkerbell.listening(self.network.netns, self.network.address, ARTIFACT_PORT), log="http.log")

    def _python_in_netns(self, module: str, args: list[str], ready: str | Callable[[], bool],
                         log: str = "") -> run.Process:
        """One of the lab's own small servers (captainos.lab.<module>) in the namespace, once
        `ready` holds: a line its log shows, or a check of its own."""
        out = self.root / (log or f"{module}.log")
        argv = netns.exec_argv(self.network.netns, [sys.executable, "-m", f"captainos.lab.{module}", *args])
        proc = run.spawn(argv, out, env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        check = ready if callable(ready) else lambda: ready in out.read_text(errors="replace")
        if run.await_ready(proc, check, 15) != "ready":
            run.stop(proc)
            raise CaptainError(f"the lab's {module} did not start; see {out}")
        return proc

    def extra_kernel_args(self, registry_address: str, auth_address: str) -> list[str]:
        """What every VM of this lab boots with besides Smee's own parameters: the agent image
        (or, in a lab with credentials, the registry it comes from and its credentials)."""
        if not auth_address:
            return [f"tink_worker_image={registry_address}/{AGENT_IMAGE_PATH}", *LAB_KERNEL_PARAMS]
        # loglevel=4: the kernel prints its command line at notice level, and Debian's kernel
        # shows notices on the console (README, "Security notes"); ours hides them by default.
        return ["loglevel=4", f"docker_registry={auth_address}", f"registry_username={self.username}",
                f"registry_password={self.password}", *LAB_KERNEL_PARAMS]

    # --- attach / take down ----------------------------------------------------------------
    @classmethod
    def attach(cls, cfg: Config, name: str) -> Lab:
        """The lab a `lab up` left running."""
        root = lab_dir(cfg, name)
        state_file = root / "lab.json"
        if not state_file.is_file() or not netns.exists(netns.PREFIX + name):
            raise CaptainError(f"lab {name!r} is not up", "start it with './build.py lab up'")
        state = State.load(state_file)
        lab = cls(cfg, artifacts_dir=Path(state.artifacts), name=name, root=root, auth=bool(state.auth_registry),
                  iso=bool(state.iso_url))
        lab.state = state
        pki = root / "pki"
        lab.client = kube.Client(state.netns, state.address, tinkerbell.API_PORT, pki / "ca.crt", pki / "admin.crt",
                                 pki / "admin.key")
        lab._owner = False
        return lab

    def down(self) -> None:
        """Stop everything in the namespace, remove it and the lab's state file."""
        if self.server is not None:
            self.server.stop()
        for reg in self.registries:
            reg.stop()
        for proc in (self.http, self.dns, self.relay, self.syslog6):
            run.stop(proc)
        if self.file_server is not None:
            self.file_server.stop()
        self.network.destroy(self.runner)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "lab.json").unlink()

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._owner:
            self.down()

    # --- provisioning ------------------------------------------------------------------------
    def accel(self) -> Accel:
        """The lab's VMs' accelerator: KVM where a probe kernel really boots under it (up to 20 s
        to find out), decided once per lab; a benchmark asks before it starts its clock."""
        if self._accel is None:
            self._accel = qemu.resolve_accel(Arch.AMD64, self.cfg.qemu_accel, self.artifacts / "vmlinuz-x86_64")
        return self._accel

    def provision(self, plan: Provision, *, workdir: Path | None = None) -> vm.Run:
        """Power a VM on against the real Tinkerbell and follow its Workflow to the end."""
        if plan.boot not in BOOT_MODES:
            raise CaptainError(f"unknown boot mode {plan.boot!r}", f"use one of {', '.join(BOOT_MODES)}")
        assert self.state is not None and self.client is not None
        if plan.boot == "iso" and not self.state.iso_url:
            raise CaptainError("this lab serves no ISO", "bring it up with the ISO built")
        if plan.osie not in ("", "chart"):
            raise CaptainError(f"unknown OSIE server {plan.osie!r}", "use chart, or none for the artifact server")
        if plan.osie == "chart" and not self.state.chart_url:
            raise CaptainError("this lab runs no Helm chart file server", "bring it up with --chart")
        if plan.ipv6 not in ("", *IPV6_KINDS):
            raise CaptainError(f"unknown IPv6 kind {plan.ipv6!r}", f"use one of {', '.join(IPV6_KINDS)}")
        if (plan.ipv6 == "ipv6-only") != (plan.boot == "direct"):
            raise CaptainError("the IPv6-only network is booted directly, and only it",
                               "use boot='direct' with ipv6='ipv6-only'")
        work = workdir or Path(tempfile.mkdtemp(prefix=f"captainos-lab-{self.name}-"))
        work.mkdir(parents=True, exist_ok=True)
        mac, ip = plan.mac, self.network.host(plan.index)
        reg_host = self.registry_host(plan.ipv6)
        variables = {"worker_id": "{{.device_1}}", "device_1": "{{.device_1}}", "registry": reg_host,
                     "action_image": f"{reg_host}/{vm.ACTION_REPO}:{vm.ACTION_TAG}",
                     "hub": f"{reg_host}/{hub.REPO_PATH}",
                     "hub_disk": f"{reg_host}/{hub.DISK_REPO}:{hub.DISK_TAG}",
                     "artifacts": f"http://{self.state.address}:{ARTIFACT_PORT}"}
        wf = workflow.load(plan.workflow, variables)
        self._check_workflow(wf, mac)
        params = plan.append
        if plan.ipv6 == "netboot-then-ipv6":
            a6 = self.network.address6
            params += (f"grpc_authority=[{a6}]:{tinkerbell.GRPC_PORT}", f"syslog_host={a6}",
                       f"tink_worker_image={reg_host}/{AGENT_IMAGE_PATH}")
        hw_name = kube.object_name(mac)
        run_name = f"{wf.name.lower().replace(' ', '-').replace('_', '-').replace('.', '-')}-{secrets.token_hex(3)}"
        hostname = f"captain-{plan.index:02d}"
        self._clear(hw_name)
        self.client.create("hardware", kube.hardware(
            hw_name, mac=mac, ip=ip, netmask=self.network.netmask, gateway=self.network.address, hostname=hostname,
            uefi=plan.boot != "bios", kernel_params=params, nameservers=(self.network.address,),
            osie_url=self.state.chart_url if plan.osie == "chart" else ""))
        self.client.create("templates", kube.template(run_name, wf))
        self.client.create("workflows", kube.workflow_object(run_name, template_name=run_name, hardware_name=hw_name,
                                                             mac=mac))
        log.info(f"==> {plan.boot} boot of {mac} ({ip}), workflow {run_name}")
        tap = f"tap{plan.index}"
        self.network.add_tap(self.runner, tap, self.network.only6_bridge if plan.ipv6 == "ipv6-only" else "")
        watch6 = f"{WATCH6}_{plan.index}"
        if plan.ipv6:
            run.run(netns.exec_argv(self.network.netns, ["nft", "-f", "-"]), input_text=watch6_rules(mac, watch6))
        disk = work / "disk.img"
        self.runner.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), plan.disk_size])
        if plan.other_network not in ("", *other.KINDS):
            raise CaptainError(f"unknown other network {plan.other_network!r}", f"use one of {', '.join(other.KINDS)}")
        side = (other.Other.make(self.network, plan.index, work, (SERVER_NAME,), answer=plan.other_network == "dhcp")
                if plan.other_network else None)
        if side is not None:
            try:
                side.up(self.runner)
            except BaseException:
                side.down(self.runner)
                self.runner.run(["ip", "-n", self.network.netns, "link", "del", tap], check=False)
                raise
        machine = self._machine(plan, tap, disk, work, side)
        log_offset = self._log_size()
        syslog6_file = self.root / "syslog6.jsonl"
        syslog6_offset = syslog6_file.stat().st_size if syslog6_file.exists() else 0
        http_offset = (self.root / "http.log").stat().st_size if (self.root / "http.log").exists() else 0
        access = helm_chart.access_path(self.chart_work)
        access_offset = access.stat().st_size if access.exists() else 0
        guest = qemu.Guest(machine, workdir=work / "qemu", secrets=(self.password,))
        fw = vm.Console(work / "serial0.log")
        con = vm.Console(work / "serial1.log")
        guest.start()
        started = time.time()
        fw.start()
        con.start()
        obj: dict[str, Any] = {}
        found_other: dict[str, Any] = {}
        found6: dict[str, Any] = {}
        try:
            if plan.registry_delay > 0:
                self._pause_registries(plan.registry_delay, started)
            obj = self._follow(run_name, guest, plan, started, con)
            if plan.restart:
                restarted = self._wait_restart(plan, fw, con)
                log.info(f"    {plan.restart} seen {restarted - started:.0f}s after power-on")
            time.sleep(plan.settle)
            if side is not None and side.answer:
                found_other = side.probe(plan.other_mac)
            found6["addresses"] = neighbours6(self.network.netns, mac)
            if plan.ipv6:
                found6.update(netns.counters(self.network.netns, watch6, family="inet"))
        finally:
            self._power_off(guest)
            fw.stop()
            con.stop()
            with contextlib.suppress(CaptainError, OSError):
                obj = self.client.get("workflows", run_name) or obj
            self.runner.run(["ip", "-n", self.network.netns, "link", "del", tap], check=False)
            if plan.ipv6:
                run.run(netns.exec_argv(self.network.netns, ["nft", "delete", "table", "inet", watch6]), check=False)
            if side is not None:
                side.down(self.runner)
        records = list(tinkerbell.log_records(self.root / "tinkerbell.log", log_offset))
        stamps = [vm.stamp(str(r.get("time", ""))) or started for r in records]
        events = []
        with contextlib.suppress(CaptainError, OSError):
            events = [e for e in self.client.events() if e.get("involvedObject", {}).get("name") in (run_name, hw_name)]
        syslog = [m for m in smee_syslog(records, stamps) if m.peer == ip]  # other VMs may share the lab
        # And what came over IPv6 from this VM's addresses, to the lab's own receiver.
        mine6 = {f"[{a}]" for a in found6.get("addresses", [])}
        syslog += [m for m in syslogd.read_lines(syslog6_file, syslog6_offset) if m.peer.rpartition(":")[0] in mine6]
        syslog.sort(key=lambda m: m.received)
        http = self.http_lines(http_offset, ip)
        http += [(r.time, f"{r.method} {r.path}") for r in helm_chart.access_log(access, access_offset)
                 if r.client == ip]
        out = vm.Run(name=run_name, state=kube.workflow_state(obj), console=list(con.lines), syslog=syslog,
                     started=started, disk=disk, mac=mac, index=plan.index, workflow=obj, events=events, smee=records,
                     firmware_console=list(fw.lines), http=sorted(http), other=found_other, ipv6=found6)
        out.timeline = vm.timeline(out)
        (work / "outcome.json").write_text(json.dumps({"workflow": obj, "events": events}, indent=1, default=str))
        return out

    def _check_workflow(self, wf: workflow.Workflow, mac: str) -> None:
        """Refuse, before anything is made, what would only time out: a task for a machine that
        is not this VM, or an action image the sealed lab cannot pull."""
        for task in wf.tasks:
            if task.worker not in ("{{.device_1}}", mac.lower()):
                raise CaptainError(f"task {task.name!r} is for worker {task.worker}, which is not this VM ({mac})",
                                   'use worker: "{{ worker_id }}" (Tinkerbell fills in the VM\'s MAC)')
        for _, _, _, action in wf.steps():
            self._check_image(action.name, action.image)

    def registry_host(self, ipv6: str = "") -> str:
        """The open registry as a VM of this IPv6 kind names it."""
        assert self.state is not None
        port = self.state.registry.rpartition(":")[2]
        if ipv6 == "netboot-then-ipv6":
            return f"[{self.network.address6}]:{port}"
        if ipv6 == "ipv6-only":
            return f"{SERVER_NAME6}:{port}"
        return self.state.registry

    def _check_image(self, action: str, image: str) -> None:
        assert self.state is not None
        registries = [addr for addr in (self.state.registry, self.state.auth_registry) if addr]
        host, _, rest = image.partition("/")
        # The open registry by its IPv6 address or name is the same registry (checked at its IPv4 one).
        host = self.state.registry if host in (self.registry_host(k) for k in IPV6_KINDS) else host
        if host not in registries:
            raise CaptainError(f"action {action!r}: image {image} is not in the lab's registry "
                               f"({', '.join(registries)}); the lab has no route out", "push it there first")
        repo, _, tag = rest.partition("@") if "@" in rest else rest.rpartition(":")
        url = f"https://{host}/v2/{repo}/manifests/{tag}"
        ctx = ssl.create_default_context(cafile=str(registry.CA(self.cfg.cache_dir / "e2e-ca").cert))
        accept = {"Accept": f"{oci.MEDIA_MANIFEST}, {oci.MEDIA_INDEX}"}

        def head() -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD", headers=accept), context=ctx,
                                            timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
        status = netns.call_in(self.network.netns, head)
        if status == 404:
            raise CaptainError(f"action {action!r}: image {image} does not exist in the lab's registry")
        if status not in (200, 401):
            raise CaptainError(f"action {action!r}: the lab's registry answered {status} for {image}")

    def _clear(self, hw_name: str) -> None:
        """Remove earlier Workflows (tink server finds work by agent id and a finished one can
        shadow a newer one) and the Hardware of this VM."""
        assert self.client is not None
        for item in self.client.items("workflows"):
            if item.get("spec", {}).get("hardwareRef") == hw_name:
                self.client.delete("workflows", item["metadata"]["name"])
        self.client.delete("hardware", hw_name)

    def _machine(self, plan: Provision, tap: str, disk: Path, work: Path, side: other.Other | None) -> qemu.Machine:
        assert self.state is not None
        firmware = None
        cdrom = None
        kernel = initrd = None
        append = ""
        if plan.boot == "direct":
            kernel, initrd = (self.artifacts / name for name in artifacts.smee_links(self.cfg.arch))
            reg_host = self.registry_host(plan.ipv6)
            append = " ".join([direct_cmdline(mac=plan.mac.lower(), grpc=f"{SERVER_NAME6}:{tinkerbell.GRPC_PORT}",
                                              syslog_host=SERVER_NAME6, agent_image=f"{reg_host}/{AGENT_IMAGE_PATH}"),
                               *plan.append])
        if plan.boot in ("uefi", "iso"):
            firmware = OVMF
        if plan.boot == "iso":
            cdrom = self._patched_iso(plan.mac, work)
        return qemu.Machine(
            Arch.AMD64, mem=plan.mem or self.cfg.qemu_mem, smp=self.cfg.qemu_smp, accel=self.accel(),
            serial_log=work / "serial0.log", serial2_log=work / "serial1.log", monitor=work / "monitor.sock",
            mac=plan.mac, netdev=f"tap,id=net0,ifname={tap},script=no,downscript=no", disks=(disk,),
            firmware=firmware, cdrom=cdrom, net_boot=cdrom is None and kernel is None, reboot=plan.restart == "reboot",
            kernel=kernel, initrd=initrd, append=append, default_console=kernel is None,
            netns=self.network.netns,
            # With a second NIC, the boot NIC sits in a high PCI slot: the other one is named first.
            nic_slot=0x10 if side is not None else 0, extra=tuple(side.qemu_args(plan.other_mac)) if side else ())

    def _patched_iso(self, mac: str, work: Path) -> Path:
        """The ISO as Smee serves it for this MAC (patched with its kernel command line), fetched
        the way a BMC's virtual media would."""
        assert self.state is not None
        url = f"http://{self.state.address}:{tinkerbell.HTTP_PORT}/iso/{mac.lower()}/captainos.iso"
        dest = work / "smee.iso"

        def fetch() -> None:
            with urllib.request.urlopen(url, timeout=120) as resp, dest.open("wb") as sink:
                shutil.copyfileobj(resp, sink)
        log.info(f"    fetching the ISO Smee patched for {mac}: {url}")
        netns.call_in(self.network.netns, fetch)
        return dest

    def _pause_registries(self, delay: float, started: float) -> None:
        for reg in self.registries:
            reg.stop()
        import threading

        def later() -> None:
            time.sleep(max(0.0, delay - (time.time() - started)))
            log.info(f"    starting the registries {time.time() - started:.0f}s after power-on")
            for reg in self.registries:
                reg.start()
        threading.Thread(target=later, daemon=True).start()

    def _follow(self, name: str, guest: qemu.Guest, plan: Provision, started: float,
                console: vm.Console) -> dict[str, Any]:
        """Poll the Workflow until its state is final; log each action's change. A console line
        matching one of plan.give_up ends the run with that line."""
        assert self.client is not None
        deadline = time.monotonic() + plan.timeout
        seen: dict[str, str] = {}
        give_up = [re.compile(pattern) for pattern in plan.give_up]
        shown = 0  # console lines looked at for CaptainOS's own notes (an untrusted registry, ...)
        while True:
            lines = list(console.lines)
            for stamp, line in lines[shown:]:
                if CONSOLE_NOTE.search(line):
                    log.info(f"    {stamp - started:6.1f}s  console: {line.strip()[:300]}")
            shown = len(lines)
            for _, line in lines:
                if any(pattern.search(line) for pattern in give_up):
                    raise CaptainError(f"the VM's console says: {line.strip()[:200]}",
                                       f"consoles in {guest.workdir.parent}")
            obj = self.client.get("workflows", name)
            for action, state in kube.action_states(obj):
                if state and seen.get(action) != state:
                    seen[action] = state
                    log.info(f"    {time.time() - started:6.1f}s  action {action}: {state}")
            if kube.workflow_state(obj) in kube.FINAL:
                log.info(f"    workflow {name}: {kube.workflow_state(obj)} after {time.time() - started:.0f}s")
                return dict(obj)
            if guest.proc is not None and guest.proc.poll() is not None:
                raise CaptainError(f"QEMU exited with code {guest.proc.returncode} before the workflow ended",
                                   f"consoles in {guest.workdir.parent}")
            if time.monotonic() > deadline:
                raise CaptainError(f"workflow {name} still {kube.workflow_state(obj) or 'not started'} after "
                                   f"{plan.timeout:.0f}s", f"consoles in {guest.workdir.parent}")
            time.sleep(2.0)

    def _wait_restart(self, plan: Provision, fw: vm.Console, con: vm.Console) -> float:
        """When the machine was seen restarting: a second firmware start for a reboot; for kexec a
        second kernel on the OS console with no firmware start in between."""
        deadline = time.monotonic() + plan.restart_timeout
        while time.monotonic() < deadline:
            firmware = [t for t, line in list(fw.lines) if FIRMWARE_START.search(line)]
            kernels = [t for t, line in list(con.lines) if KERNEL_START.search(line)]
            if plan.restart == "reboot" and len(firmware) >= 2:
                return firmware[1]
            if plan.restart == "kexec" and len(kernels) >= 2:
                if len(firmware) > 1:
                    raise CaptainError("the machine went through its firmware again: a reboot, not a kexec")
                restarted = kernels[1]
                if not plan.after_restart or any(t >= restarted and re.search(plan.after_restart, line)
                                                 for t, line in list(con.lines)):
                    return restarted
            time.sleep(1.0)
        seen = f"no {plan.restart}" + (f" followed by {plan.after_restart!r}" if plan.after_restart else "")
        raise CaptainError(f"{seen} seen within {plan.restart_timeout:.0f}s after the workflow ended")

    def _power_off(self, guest: qemu.Guest) -> None:
        if guest.proc is None:
            return
        if guest.proc.poll() is not None:
            guest.kill()  # it ended by itself (a workflow that powers off): reaped, and its boot logged
            return
        try:
            guest.monitor("quit")
            guest.wait_exit(15)
        except (CaptainError, OSError):
            guest.kill()

    def _log_size(self) -> int:
        path = self.root / "tinkerbell.log"
        return path.stat().st_size if path.exists() else 0

    def http_lines(self, offset: int, client: str) -> list[tuple[float, str]]:
        """(time, "GET /path") of the artifact server's requests from one client since offset."""
        found = []
        for line in cache.read_text_from(self.root / "http.log", offset).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("client") == client:
                found.append((float(rec["time"]), f"{rec['method']} {rec['path']}"))
        return found

    def diagnostics(self) -> str:
        text = self.server.tail(40) if self.server is not None else ""
        return text.replace(self.password, "***")
