"""A real container registry for tests: Debian's docker-registry (distribution 2.8) with TLS.

The certificate authority is made once per cache dir (`<cache>/e2e-ca/`) and reused, so an
image built with `--extra-ca-certs <cache>/e2e-ca/ca.pem` trusts every registry the harness
starts. Each registry gets a fresh server certificate for 10.0.2.2 (the host as QEMU user
networking shows it) and 127.0.0.1, a temp storage dir (or a given one, to restart it with
the same content), a log file, and optionally htpasswd (bcrypt) authentication.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from captainos.core import cache, log, run
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab.oci import Credentials

REGISTRY_BINARY = "/usr/bin/docker-registry"
# Addresses the server certificate is valid for: the QEMU user-net host alias and loopback.
CERT_IPS = ("10.0.2.2", "127.0.0.1")
CA_SUBJECT = "/CN=CaptainOS end-to-end test CA"
REALM = "captainos-e2e"


@dataclass(frozen=True)
class CA:
    """The harness CA: `ca.pem` is what the image trusts; `ca.key` never leaves the cache."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def key(self) -> Path:
        return self.root / "ca.key"


def ca_argv(key: Path, cert: Path) -> list[str]:
    return ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
            "-keyout", str(key), "-out", str(cert), "-subj", CA_SUBJECT,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign"]


def ensure_ca(cache_dir: Path, runner: Runner) -> CA:
    """The stable harness CA, generated on first use (atomically: a half-made CA is never used)."""
    ca = CA(cache_dir / "e2e-ca")
    if ca.cert.is_file() and ca.key.is_file():
        return ca
    ca.root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".e2e-ca.", dir=ca.root.parent))
    try:
        runner.run(ca_argv(work / "ca.key", work / "ca.pem"), log_file=work / "openssl.log")
        (work / "openssl.log").unlink()
        (work / "ca.key").chmod(0o600)
        work.chmod(0o755)  # ca.pem is public (the image build reads it); ca.key stays 0600
        cache.remove(ca.root)
        work.rename(ca.root)
    finally:
        if work.exists():
            cache.remove(work)
    log.info(f"    created the end-to-end test CA {ca.cert}")
    return ca


def server_ext(ips: tuple[str, ...]) -> str:
    """openssl x509 -extfile content of a TLS server certificate for these IP addresses (IPv4
    or IPv6) and host names."""
    def entry(name: str) -> str:
        try:
            return f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            return f"DNS:{name}"
    san = ",".join([entry(ip) for ip in ips] + ["DNS:localhost"])
    return (f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")


def issue_server_cert(ca: CA, runner: Runner, dest: Path, ips: tuple[str, ...] = CERT_IPS) -> tuple[Path, Path]:
    """Write dest/server.pem (leaf + CA) and dest/server.key signed by the CA; return both paths."""
    dest.mkdir(parents=True, exist_ok=True)
    key, csr, leaf, ext = dest / "server.key", dest / "server.csr", dest / "leaf.pem", dest / "server.ext"
    ext.write_text(server_ext(ips))
    openssl_log = dest / "openssl.log"
    runner.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                "-subj", "/CN=captainos-e2e-registry"], log_file=openssl_log)
    key.chmod(0o600)
    runner.run(["openssl", "x509", "-req", "-sha256", "-days", "30", "-in", str(csr), "-CA", str(ca.cert),
                "-CAkey", str(ca.key), "-set_serial", str(time.time_ns()), "-extfile", str(ext),
                "-out", str(leaf)], log_file=openssl_log)
    chain = dest / "server.pem"
    chain.write_text(leaf.read_text() + ca.cert.read_text())
    return chain, key


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def config_yaml(*, port: int, storage: Path, cert: Path, key: Path, htpasswd: Path | None,
                bind: str = "127.0.0.1") -> str:
    """The registry's configuration (YAML is a superset of JSON: written with json for exact quoting)."""
    import json

    doc: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"{bind}:{port}", "tls": {"certificate": str(cert), "key": str(key)},
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if htpasswd is not None:
        doc["auth"] = {"htpasswd": {"realm": REALM, "path": str(htpasswd)}}
    return json.dumps(doc, indent=1) + "\n"


def serve_argv(config: Path) -> list[str]:
    return [REGISTRY_BINARY, "serve", str(config)]


def htpasswd_line(runner: Runner, creds: Credentials) -> str:
    """A bcrypt htpasswd line; the password goes over stdin (-i), never on an argv."""
    result = runner.run(["htpasswd", "-n", "-B", "-i", creds.username], capture=True,
                        input_text=creds.password + "\n")
    line = result.stdout.strip()
    if not line.startswith(f"{creds.username}:$2"):
        raise CaptainError("htpasswd did not produce a bcrypt entry", "install apache2-utils")
    return line + "\n"


@dataclass
class Registry:
    """One running registry. `with Registry(...) as reg:` starts it and stops it cleanly.

    The port and storage are chosen at construction, so `stop()` then `start()` brings the
    same registry back with the same content (used to start it after the VM).
    """

    ca: CA
    workdir: Path
    name: str = "registry"
    creds: Credentials | None = None
    runner: Runner = field(default_factory=Runner)
    port: int = 0
    bind: str = "127.0.0.1"  # QEMU user networking turns the guest's 10.0.2.2 into host loopback
    # In the lab: the registry runs in a network namespace (runner wraps its command) and
    # listens on the lab's address, which host and guest both use; call_in runs a probe there.
    lab_address: str = ""
    also: tuple[str, ...] = ()  # in the lab: its other addresses and names (the certificate names them)
    call_in: Callable[[Callable[[], int | None]], int | None] | None = None
    proc: run.Process | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.lab_address:
            # Every address of the sealed namespace, IPv4 and IPv6 (one dual-stack socket).
            self.bind = "[::]"
        self.port = self.port or free_port()
        self.root = self.workdir / self.name
        self.storage = self.root / "storage"
        self.log_file = self.root / "registry.log"
        self.config_file = self.root / "config.yml"
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        ips = CERT_IPS + ((self.lab_address, *self.also) if self.lab_address else ())
        self.cert, self.key = issue_server_cert(self.ca, self.runner, self.root / "tls", ips)
        htpasswd = None
        if self.creds is not None:
            htpasswd = self.root / "htpasswd"
            htpasswd.touch(mode=0o600)
            htpasswd.write_text(htpasswd_line(self.runner, self.creds))
        cache.atomic_write(self.config_file, config_yaml(port=self.port, storage=self.storage, cert=self.cert,
                                                         key=self.key, htpasswd=htpasswd, bind=self.bind))

    # Addresses: the host pushes to 127.0.0.1, the guest pulls from 10.0.2.2.
    @property
    def host_address(self) -> str:
        return f"{self.lab_address or '127.0.0.1'}:{self.port}"

    @property
    def guest_address(self) -> str:
        return f"{self.lab_address or '10.0.2.2'}:{self.port}"

    @property
    def cert_dir(self) -> Path:
        """A directory holding only the CA as `ca.crt`: what skopeo's --*-cert-dir expects."""
        path = self.root / "certs.d"
        if not (path / "ca.crt").is_file():
            cache.atomic_copy(self.ca.cert, path / "ca.crt")
        return path

    def start(self, timeout: float = 30.0) -> Registry:
        if self.proc is not None:
            return self
        argv, _, _ = self.runner.wrap(serve_argv(self.config_file), {})
        self.proc = run.spawn(argv, self.log_file)
        self.wait_ready(timeout)
        log.info(f"    {self.name} listening on {self.host_address}" + (" (auth)" if self.creds else ""))
        return self

    def ping(self) -> int | None:
        """HTTP status of GET /v2/ (200 open, 401 with auth), or None when not answering."""
        if self.call_in is not None:
            return self.call_in(self._ping)
        return self._ping()

    def _ping(self) -> int | None:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        try:
            with urllib.request.urlopen(f"https://{self.host_address}/v2/", context=ctx, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout: float) -> None:
        state = run.await_ready(self.proc, lambda: self.ping() in (200, 401), timeout)
        if state == "ready":
            return
        if state == "exited":
            assert self.proc is not None
            raise CaptainError(f"{self.name} exited with code {self.proc.returncode} at start",
                               f"see {self.log_file}:\n{self.log_tail()}")
        self.stop()
        raise CaptainError(f"{self.name} did not answer on {self.host_address} within {timeout:.0f}s",
                           f"see {self.log_file}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        run.stop(proc)

    def log_tail(self, lines: int = 30, skip: str = "") -> str:
        """The last lines of the registry log, leaving out those containing `skip` (if given)."""
        if not self.log_file.is_file():
            return "(no registry log)"
        kept = [line for line in self.log_file.read_text(errors="replace").splitlines() if not skip or skip not in line]
        return "\n".join(kept[-lines:])

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
