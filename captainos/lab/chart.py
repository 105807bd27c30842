"""The Helm chart's file server, as the lab runs it.

Tinkerbell's chart (helm/tinkerbell in the tinkerbell module, v0.25.0) serves CaptainOS with
nginx from our published OCI image: with `optional.captainos.enabled` the image is an image
volume mounted at /captain, and the chart's ConfigMap holds an nginx.conf whose root is
/captain. The lab does the same with real parts:

- the configuration is `helm template` of that chart (helm built from the module proxy), the
  ConfigMap's nginx.conf taken as it is;
- the image is the lab's out/ written by `publish` and pushed to the lab registry, pulled by
  a private containerd and mounted read-only from its top snapshot, as the kubelet mounts an
  image volume;
- Debian's nginx runs with that file in a root of its own (a chroot in a private mount
  namespace, inside the lab's network namespace) holding /etc/nginx/nginx.conf and /captain
  where the pod has them, so nothing on the host is changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from captainos.core import cache, log, pins, run
from captainos.core.config import Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import agent, netns, oci
from captainos.lab.containerd import Containerd, Mount
from captainos.sources import golang
from captainos.stages import publish

CHART = "helm/tinkerbell"  # inside the tinkerbell module
CONFIGMAP = "templates/osie/nginx-configmap.yaml"
VALUES = ("optional.captainos.enabled=true", "optional.hookos.enabled=false")
NGINX = "/usr/sbin/nginx"
IMAGE_PATH = "tinkerbell/captainos"  # the lab registry's copy of the published image
IMAGE_TAG = "lab"
# An access log line of nginx's default (combined) format: client, time, request, status, size.
ACCESS = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+)[^"]*" (\d{3}) (\d+)')


def chart_dir(cfg: Config, runner: Runner) -> Path:
    """The chart as the tinkerbell module ships it (downloaded, its go.sum hash checked)."""
    result = runner.run([golang.go_binary(), "mod", "download", "-json", pins.TINK_AGENT.query],
                        env=golang.go_env(cfg.cache_dir, cfg.arch), capture=True)
    modules = golang.parse_download(result.stdout)
    golang.verify(modules, (pins.TINK_AGENT,))
    chart = Path(modules[pins.TINK_AGENT.path]["Dir"]) / CHART
    if not (chart / CONFIGMAP).is_file():
        raise CaptainError(f"{pins.TINK_AGENT.query} has no {CHART}/{CONFIGMAP}")
    return chart


def template_argv(helm: Path, chart: Path, address: str) -> list[str]:
    """`helm template` of the chart with CaptainOS on and HookOS off, as its install line sets
    it (publicIP and artifactsFileServer: the lab's address and the chart's own OSIE port),
    the ConfigMap only."""
    port = yaml.safe_load((chart / "values.yaml").read_text())["optional"]["osie"]["port"]
    values = (*VALUES, f"publicIP={address}", f"artifactsFileServer=http://{address}:{port}")
    sets = [arg for value in values for arg in ("--set", value)]
    return [str(helm), "template", "tinkerbell", str(chart), "--namespace", "tinkerbell", *sets,
            "--show-only", CONFIGMAP]


def nginx_conf(rendered: str) -> str:
    """The nginx.conf of the rendered ConfigMap."""
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    maps = [doc for doc in docs if doc.get("kind") == "ConfigMap" and "nginx.conf" in doc.get("data", {})]
    if len(maps) != 1:
        raise CaptainError(f"the chart rendered {len(maps)} ConfigMaps with an nginx.conf, not one")
    return str(maps[0]["data"]["nginx.conf"])


def render(cfg: Config, runner: Runner, address: str) -> str:
    """The chart's nginx.conf for CaptainOS, rendered by the real helm."""
    helm = agent.build(cfg, runner, program=agent.HELM) / agent.HELM.binary
    with tempfile.TemporaryDirectory(prefix="captainos-helm-") as home:
        env = {f"HELM_{kind}_HOME": f"{home}/{kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")}
        argv = template_argv(helm, chart_dir(cfg, runner), address)
        result = runner.run(argv, env={**env, "HOME": home}, capture=True)
    return nginx_conf(result.stdout)


def listen_port(conf: str) -> int:
    ports = {int(m) for m in re.findall(r"^\s*listen\s+(\d+)\s*;", conf, re.MULTILINE)}
    if len(ports) != 1:
        raise CaptainError(f"the chart's nginx.conf listens on {sorted(ports) or 'no port'}, not one port")
    return ports.pop()


def served_root(conf: str) -> str:
    roots = set(re.findall(r"^\s*root\s+(\S+?)\s*;", conf, re.MULTILINE))
    if len(roots) != 1:
        raise CaptainError(f"the chart's nginx.conf serves {sorted(roots) or 'no root'}, not one root")
    return roots.pop()


def diff_ids(layout: Path, arch: Arch) -> list[str]:
    """The layers of arch's image in an OCI layout (its config's rootfs.diff_ids)."""
    def blob(digest: str) -> dict:  # type: ignore[type-arg]
        return dict(json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text()))

    index = json.loads((layout / "index.json").read_text())
    top = blob(index["manifests"][0]["digest"])
    (manifest,) = [m for m in top["manifests"] if m["platform"]["architecture"] == arch.go_arch()]
    return list(blob(blob(manifest["digest"])["config"]["digest"])["rootfs"]["diff_ids"])


def root_script(root: Path, view: Mount, captain: str) -> str:
    """What runs in the private mount namespace: the pod's filesystem (the host's /usr read-only,
    /dev, the image volume at the chart's root), then nginx chrooted into it."""
    lines = ["set -eu",
             f"mount --rbind /usr {shlex.quote(str(root / 'usr'))}",
             f"mount -o remount,bind,ro {shlex.quote(str(root / 'usr'))}",
             f"mount --rbind /dev {shlex.quote(str(root / 'dev'))}",
             shlex.join(view.argv(root / captain.lstrip("/"))),
             f"exec chroot {shlex.quote(str(root))} {NGINX} -e stderr -g 'daemon off;' -c /etc/nginx/nginx.conf"]
    return "\n".join(lines)


def make_root(root: Path, conf: str, captain: str) -> None:
    """The directories the pod's container has: nginx's own (Debian's build paths), the
    ConfigMap's file, the mount points; the host's /usr is mounted over usr/ at start."""
    if root.exists():
        shutil.rmtree(root)
    for sub in ("usr", "dev", "etc/nginx", "run", "tmp", "var/log/nginx", "var/lib/nginx", "var/lock",
                captain.lstrip("/")):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):  # a merged /usr, as Debian's is
        if Path("/", link).is_symlink():
            (root / link).symlink_to(os.readlink(Path("/", link)))
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")  # the conf says `user root;`
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "nginx" / "nginx.conf").write_text(conf)


@dataclass(frozen=True)
class Request:
    client: str
    time: float
    method: str
    path: str
    status: int
    size: int  # body bytes sent


def access_log(path: Path, offset: int = 0) -> list[Request]:
    """nginx's access log (its default format) from offset on."""
    found = []
    for line in cache.read_text_from(path, offset).splitlines():
        if m := ACCESS.match(line):
            when = datetime.strptime(m.group(2), "%d/%b/%Y:%H:%M:%S %z").timestamp()
            found.append(Request(m.group(1), when, m.group(3), m.group(4), int(m.group(5)), int(m.group(6))))
    return found


def access_path(work: Path) -> Path:
    """nginx's access log of a file server whose work directory is work (Debian's build path,
    inside the server's root)."""
    return work / "root" / "var" / "log" / "nginx" / "access.log"


class FileServer:
    """The chart's nginx serving the published image, in the lab's network namespace."""

    def __init__(self, cfg: Config, runner: Runner, work: Path, netns_name: str, address: str) -> None:
        self.cfg = cfg
        self.runner = runner
        self.work = work
        self.netns = netns_name
        self.address = address
        self.root = work / "root"
        self.containerd: Containerd | None = None
        self.proc: run.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def access(self) -> Path:
        return access_path(self.work)

    def start(self, out_dir: Path, registry_host: str, cert_dir: Path, tools_bin: Path) -> FileServer:
        from captainos.lab import tinkerbell

        if not Path(NGINX).is_file():
            raise CaptainError(f"the Helm chart's file server needs Debian's nginx ({NGINX} is missing)",
                               "apt-get install nginx (./build.py setup does)")
        conf = render(self.cfg, self.runner, self.address)
        self.port, captain = listen_port(conf), served_root(conf)
        layout = self.work / "layout"
        publish.write(out_dir, layout, IMAGE_TAG)
        ref = f"{registry_host}/{IMAGE_PATH}:{IMAGE_TAG}"
        oci.push(netns.NetnsRunner(netns=self.netns), layout, IMAGE_TAG, ref, cert_dir=cert_dir)
        self.containerd = Containerd(tools_bin, self.work / "containerd", netns=self.netns).start()
        self.containerd.pull(ref, f"linux/{self.cfg.arch.go_arch()}", cert_dir / "ca.crt")
        view = self.containerd.view("captain-artifacts", diff_ids(layout, self.cfg.arch))
        make_root(self.root, conf, captain)
        script = root_script(self.root, view, captain)
        argv = netns.exec_argv(self.netns, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        log.info(f"    the Helm chart's nginx: {captain} from {ref}, port {self.port}")
        self.proc = run.spawn(argv, self.work / "nginx.log")
        if run.await_ready(self.proc, lambda: tinkerbell.listening(self.netns, self.address, self.port), 15) != "ready":
            tail = (self.work / "nginx.log").read_text(errors="replace")[-1500:]
            self.stop()
            raise CaptainError(f"the chart's nginx did not start: {tail.strip()}", f"see {self.work / 'nginx.log'}")
        return self

    def stop(self) -> None:
        run.stop(self.proc)
        self.proc = None
        if self.containerd is not None:
            self.containerd.stop()
            self.containerd = None
