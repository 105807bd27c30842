"""The real Tinkerbell server in the lab: certificates, kubeconfig, command line, process, log.

One process (`tinkerbell`, built with `-tags embedded` by agent.py) runs etcd, kube-apiserver,
a controller manager, the CRD migrations, tink server, the tink controller and Smee (DHCP,
TFTP, the iPXE script, the ISO patcher and a syslog receiver). It runs inside the lab's
network namespace and listens on the bridge address only.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captainos.core import cache, log, run
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import kube, netns

API_PORT = 6443
GRPC_PORT = 42113
HTTP_PORT = 7080
EXTRA_ARGS_ENV = "TINKERBELL_IPXE_HTTP_SCRIPT_EXTRA_KERNEL_ARGS"  # --ipxe-http-script-extra-kernel-args


@dataclass(frozen=True)
class Ports:
    api: int = API_PORT
    grpc: int = GRPC_PORT
    http: int = HTTP_PORT


@dataclass(frozen=True)
class Certs:
    """The lab's own PKI: a CA, the API server's certificate, an admin client, the
    service-account key, and a kubeconfig for the admin."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {"ca": "ca.crt", "ca_key": "ca.key", "server": "server.crt", "server_key": "server.key",
                 "admin": "admin.crt", "admin_key": "admin.key", "sa_key": "service-account.key",
                 "kubeconfig": "kubeconfig"}
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)


def openssl_argvs(certs: Certs, address: str) -> list[list[str]]:
    """The openssl commands that make the PKI (pure; the extension files are written first)."""
    r = certs.root
    return [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
         "-keyout", str(certs.ca_key), "-out", str(certs.ca), "-subj", "/CN=captainos-lab-ca",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "genrsa", "-out", str(certs.sa_key), "2048"],
        ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs.server_key),
         "-out", str(r / "server.csr"), "-subj", "/CN=kube-apiserver"],
        ["openssl", "x509", "-req", "-sha256", "-days", "3650", "-in", str(r / "server.csr"), "-CA", str(certs.ca),
         "-CAkey", str(certs.ca_key), "-set_serial", "2", "-extfile", str(r / "server.ext"), "-out", str(certs.server)],
        ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs.admin_key),
         "-out", str(r / "admin.csr"), "-subj", "/O=system:masters/CN=captainos-lab-admin"],
        ["openssl", "x509", "-req", "-sha256", "-days", "3650", "-in", str(r / "admin.csr"), "-CA", str(certs.ca),
         "-CAkey", str(certs.ca_key), "-set_serial", "3", "-extfile", str(r / "client.ext"), "-out", str(certs.admin)],
    ]


def server_ext(address: str) -> str:
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"]
    san = ",".join([f"IP:{address}", "IP:127.0.0.1"] + [f"DNS:{n}" for n in names])
    return (f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")


CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")


def kubeconfig(certs: Certs, address: str, port: int) -> dict[str, Any]:
    """A kubeconfig with the certificates embedded (kubectl reads it as it is)."""
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "captainos-lab",
        "clusters": [{"name": "captainos-lab", "cluster": {"server": f"https://{address}:{port}",
                                                           "certificate-authority-data": b64(certs.ca)}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": b64(certs.admin),
                                             "client-key-data": b64(certs.admin_key)}}],
        "contexts": [{"name": "captainos-lab", "context": {"cluster": "captainos-lab", "user": "admin"}}],
    }


def make_certs(root: Path, address: str, port: int, runner: Runner) -> Certs:
    """Create the PKI and kubeconfig under root (all private files 0600)."""
    certs = Certs(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    (root / "server.ext").write_text(server_ext(address))
    (root / "client.ext").write_text(CLIENT_EXT)
    for argv in openssl_argvs(certs, address):
        runner.run(argv, log_file=root / "openssl.log")
    for key in (certs.ca_key, certs.sa_key, certs.server_key, certs.admin_key):
        key.chmod(0o600)
    cache.atomic_write(certs.kubeconfig, json.dumps(kubeconfig(certs, address, port), indent=1) + "\n")
    certs.kubeconfig.chmod(0o600)
    return certs


def argv(binary: Path, *, certs: Certs, address: str, state: Path, osie_url: str, ports: Ports = Ports(),
         iso_url: str = "", extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of the lab's Tinkerbell (pure)."""
    cmd = [
        str(binary),
        "--backend", "kube", "--backend-kube-config", str(certs.kubeconfig),
        "--enable-embedded-etcd=true", "--enable-embedded-kube-apiserver=true", "--enable-crd-migrations=true",
        # Not part of provisioning a VM: BMC control, the serial-over-SSH server, the web UI and
        # the metadata service.
        "--enable-rufio-controller=false", "--enable-secondstar=false", "--enable-ui=false",
        "--enable-tootles=false",
        "--etcd-dir", str(state / "etcd"), "--etcd-servers", "http://127.0.0.1:2379",
        # With no default route the API server cannot pick an address by itself (it fails
        # without a word and is retried until Tinkerbell gives up): name it.
        "--advertise-address", address, "--kube-apiserver-bind-address", address, "--secure-port", str(ports.api),
        "--kube-apiserver-tls-cert-file", str(certs.server), "--kube-apiserver-tls-private-key-file",
        str(certs.server_key), "--client-ca-file", str(certs.ca),
        "--service-account-key-file", str(certs.sa_key), "--service-account-signing-key-file", str(certs.sa_key),
        "--service-account-issuer", "api",
        "--public-ipv4", address, "--bind-address", address, "--http-port", str(ports.http),
        "--tink-server-bind-port", str(ports.grpc),
        "--ipxe-http-script-osie-url", osie_url,
        "--dhcp-bind-interface", "br0",
        # Smee's syslog receiver (on by default) logs every message it receives at info level;
        # the lab reads them there.
    ]
    if iso_url:
        cmd += ["--iso-enabled", "--iso-upstream-url", iso_url, "--iso-static-ipam-enabled"]
    return cmd + list(extra)


class Server:
    """The running Tinkerbell process (in the namespace), with its JSON log in a file."""

    def __init__(self, argv: list[str], ns: str, log_file: Path, client: kube.Client,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env or {}
        self.netns = ns
        self.log_file = log_file
        self.client = client
        self.proc: run.Process | None = None

    def ports(self) -> list[tuple[str, int]]:
        """The TCP addresses this Tinkerbell will listen on (etcd's on the namespace's loopback)."""
        def value(flag: str) -> int:
            return int(self.argv[self.argv.index(flag) + 1])
        host = self.client.host
        return [(host, value("--secure-port")), (host, value("--tink-server-bind-port")),
                (host, value("--http-port")), ("127.0.0.1", 2379), ("127.0.0.1", 2380)]

    def start(self, timeout: float = 120.0) -> Server:
        taken = [f"{h}:{p}" for h, p in self.ports() if listening(self.netns, h, p)]
        if taken:
            raise CaptainError(f"Tinkerbell could not start: {', '.join(taken)} already taken in {self.netns}",
                               "another server listens there; nothing was started")
        self.proc = run.spawn(netns.exec_argv(self.netns, self.argv), self.log_file, env=self.env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the API serves Tinkerbell's resources and tink server accepts connections."""
        started = time.monotonic()
        grpc = int(self.argv[self.argv.index("--tink-server-bind-port") + 1])
        def ready() -> bool:
            return self.client.ready() and listening(self.netns, self.client.host, grpc)

        state = run.await_ready(self.proc, ready, timeout, interval=0.5)
        if state == "exited":
            assert self.proc is not None
            taken = re.search(r"listen \w+ ([\d.]+:\d+): bind: address already in use", self.tail(200))
            if taken:
                raise CaptainError(f"Tinkerbell could not start: {taken.group(1)} already taken",
                                   f"another server listens there in {self.netns}; see {self.log_file}")
            raise CaptainError(f"tinkerbell exited with code {self.proc.returncode} at start",
                               f"last lines of {self.log_file}:\n{self.tail(15)}")
        if state == "timeout":
            raise CaptainError(f"Tinkerbell was not ready (API resources, tink server on port {grpc}) "
                               f"within {timeout:.0f}s", f"see {self.log_file}")
        log.info(f"    Tinkerbell ready in {time.monotonic() - started:.1f}s")

    def tail(self, lines: int = 30) -> str:
        if not self.log_file.is_file():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        run.stop(proc, grace=20)


def listening(ns: str, host: str, port: int) -> bool:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    return netns.call_in(ns, probe)


def log_records(path: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The JSON objects of Tinkerbell's log (other lines are skipped)."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    yield obj
