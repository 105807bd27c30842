"""A private containerd on the host (the tools stage's build, the one the image runs): its own
root, state and socket, CRI off as in the image. The lab's file server and the tests pull
images with it and mount them read-only the way the kubelet mounts an image volume."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from captainos.core import run
from captainos.core.errors import CaptainError
from captainos.lab import netns as netns_mod

NAMESPACE = "k8s.io"  # the kubelet's containerd namespace


def chain_id(diff_ids: Sequence[str]) -> str:
    """The snapshot name of an image's top layer: the OCI chain ID of its diff_ids."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


@dataclass(frozen=True)
class Mount:
    """One mount as containerd hands it out (`ctr snapshots view --mounts`)."""

    type: str
    source: str
    options: tuple[str, ...]

    def argv(self, target: Path | str) -> list[str]:
        return ["mount", "-t", self.type, "-o", ",".join(self.options), self.source, str(target)]


def hosts_toml(host: str, ca: Path) -> str:
    """containerd's own trust for one registry (certs.d/HOST/hosts.toml)."""
    return (f'server = "https://{host}"\n[host."https://{host}"]\n  capabilities = ["pull", "resolve"]\n'
            f'  ca = "{ca}"\n')


class Containerd:
    """containerd with the socket at work/containerd.sock; inside a network namespace when one
    is named (pulls then reach what that namespace reaches)."""

    def __init__(self, tools_bin: Path, work: Path, *, netns: str = "") -> None:
        self.tools_bin = tools_bin
        self.work = work
        self.netns = netns
        self.socket = work / "containerd.sock"
        self.log = work / "containerd.log"
        self.proc: run.Process | None = None

    def _argv(self, argv: list[str]) -> list[str]:
        return netns_mod.exec_argv(self.netns, argv) if self.netns else argv

    def start(self, timeout: float = 30.0) -> Containerd:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "config.toml"
        config.write_text(f'version = 3\nroot = "{self.work}/root"\nstate = "{self.work}/state"\n'
                          'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", '
                          '"io.containerd.cri.v1.images"]\n'
                          f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n')
        env = {"PATH": f"{self.tools_bin}:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.proc = run.spawn(self._argv([str(self.tools_bin / "containerd"), "--config", str(config)]), self.log,
                              env=env)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                self.stop()
                raise CaptainError(f"containerd did not start: {tail.strip().splitlines()[-1:] or 'no log'}",
                                   f"see {self.log}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        run.stop(self.proc)
        self.proc = None
        # What is still mounted under its root (snapshots nerdctl cp mounted) goes with it.
        run.run(["umount", "-R", str(self.work / "root")], capture=True, check=False)

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        argv = self._argv([str(self.tools_bin / "ctr"), "--address", str(self.socket), "--namespace", NAMESPACE,
                           *args])
        result = run.run(argv, capture=True, capture_stderr=True, check=False, timeout=timeout)
        if result.returncode != 0:
            raise CaptainError(f"ctr {' '.join(args)}: {result.stderr.strip()[-300:]}")
        return result.stdout

    def pull(self, ref: str, platform: str, registry_ca: Path) -> None:
        """Pull ref for platform, trusting registry_ca for its registry only."""
        host = ref.split("/", 1)[0]
        hosts = self.work / "certs.d" / host / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(hosts_toml(host, registry_ca))
        self.ctr("images", "pull", "--hosts-dir", str(self.work / "certs.d"), "--platform", platform, ref)

    def view(self, key: str, diff_ids: Sequence[str]) -> Mount:
        """A read-only view of the image whose layers these are: what the kubelet's image volume
        gets from containerd's CRI, its top snapshot named by the chain ID. (`ctr images mount`
        would be shorter, but containerd 2.2.1's mount manager hands it a bind mount without
        options, which the kernel refuses: "no such device".)"""
        (found,) = json.loads(self.ctr("snapshots", "view", "--mounts", key, chain_id(diff_ids)))
        return Mount(found["Type"], found["Source"], tuple(found["Options"]))

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
