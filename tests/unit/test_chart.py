"""The lab's Helm-chart file server: rendering, the nginx.conf it reads, the pod's root, the
access log; containerd's chain IDs. The real helm, containerd and nginx run in the lab
(tests/lab/test_lab.py, the reboot scenario)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.lab import chart, kube
from captainos.lab.containerd import Mount, chain_id, hosts_toml

CONF = """worker_processes 1;
events {
  worker_connections  1024;
}
user root;
http {
  server {
    listen 7173;
    location / {
      sendfile           on;
      root /captain;
    }
  }
}
"""


def rendered(*maps: dict) -> str:
    return "---\n" + "\n---\n".join(yaml.safe_dump(m) for m in maps)


def configmap(conf: str = CONF) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nginx-conf"}, "data": {"nginx.conf": conf}}


def test_the_nginx_conf_is_the_configmaps_as_rendered():
    text = "# Source: tinkerbell/templates/osie/nginx-configmap.yaml\n" + rendered(configmap())
    conf = chart.nginx_conf(text)
    assert conf == CONF
    assert chart.listen_port(conf) == 7173 and chart.served_root(conf) == "/captain"


@pytest.mark.parametrize("maps", [(), (configmap(), configmap()), ({"kind": "Service", "data": {}},)],
                         ids=["none", "two", "other-kind"])
def test_anything_but_one_configmap_is_refused(maps):
    with pytest.raises(CaptainError, match=r"ConfigMaps with an nginx\.conf, not one"):
        chart.nginx_conf(rendered(*maps) if maps else "")


def test_a_conf_with_two_ports_or_roots_is_refused():
    with pytest.raises(CaptainError, match="not one port"):
        chart.listen_port(CONF.replace("listen 7173;", "listen 7173;\n    listen 80;"))
    with pytest.raises(CaptainError, match="no root"):
        chart.served_root(CONF.replace("root /captain;", ""))
    both = CONF.replace("root /captain;", "root /usr/share/nginx/html;\n      try_files $uri @captain;\n"
                                          "    }\n    location @captain {\n      root /captain;")
    with pytest.raises(CaptainError, match="not one root"):
        chart.served_root(both)


def test_helm_template_sets_what_the_charts_install_line_sets(tmp_path):
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"optional": {"osie": {"port": 7173}}}))
    argv = chart.template_argv(Path("/h/helm"), tmp_path, "10.77.0.1")
    assert argv[:4] == ["/h/helm", "template", "tinkerbell", str(tmp_path)]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["optional.captainos.enabled=true", "optional.hookos.enabled=false", "publicIP=10.77.0.1",
                    "artifactsFileServer=http://10.77.0.1:7173"]
    assert argv[-2:] == ["--show-only", "templates/osie/nginx-configmap.yaml"]


def test_the_pods_root_holds_the_conf_and_the_mount_points(tmp_path):
    root = tmp_path / "root"
    chart.make_root(root, CONF, "/captain")
    assert (root / "etc" / "nginx" / "nginx.conf").read_text() == CONF
    assert (root / "captain").is_dir() and (root / "var" / "lib" / "nginx").is_dir()
    assert (root / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    if Path("/lib").is_symlink():
        assert (root / "lib").is_symlink()
    chart.make_root(root, "other", "/captain")  # made again from nothing
    assert (root / "etc" / "nginx" / "nginx.conf").read_text() == "other"


def test_the_root_script_mounts_the_view_and_execs_nginx_chrooted(tmp_path):
    view = Mount("overlay", "overlay", ("ro", "lowerdir=/a:/b"))
    script = chart.root_script(tmp_path, view, "/captain").splitlines()
    assert script[0] == "set -eu"
    assert f"mount -o remount,bind,ro {tmp_path}/usr" in script
    assert f"mount -t overlay -o ro,lowerdir=/a:/b overlay {tmp_path}/captain" in script
    assert script[-1].startswith(f"exec chroot {tmp_path} /usr/sbin/nginx ")
    assert script[-1].endswith("-c /etc/nginx/nginx.conf")


def test_the_access_log_of_the_default_format(tmp_path):
    log = tmp_path / "access.log"
    log.write_text(
        '10.77.0.18 - - [05/Dec/2026:06:01:02 +0000] "GET /vmlinuz-x86_64 HTTP/1.1" 200 8388608 "-" "iPXE/1.21"\n'
        'garbage\n'
        '10.77.0.19 - - [05/Dec/2026:06:01:03 +0000] "HEAD /initramfs-x86_64 HTTP/1.1" 404 153 "-" "curl"\n')
    first, second = chart.access_log(log)
    assert (first.client, first.method, first.path, first.status, first.size) == (
        "10.77.0.18", "GET", "/vmlinuz-x86_64", 200, 8388608)
    assert first.time == 1796450462.0
    assert second.status == 404
    after_first = len(log.read_text().splitlines(keepends=True)[0])
    assert [r.path for r in chart.access_log(log, offset=after_first)] == ["/initramfs-x86_64"]
    assert chart.access_log(tmp_path / "none.log") == []


def test_diff_ids_are_the_arch_configs(tmp_path):
    def put(obj: dict) -> str:
        data = json.dumps(obj).encode()
        digest = hashlib.sha256(data).hexdigest()
        (tmp_path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (tmp_path / "blobs" / "sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"
    manifests = []
    for arch, ids in (("amd64", ["sha256:a1", "sha256:a2"]), ("arm64", ["sha256:b1"])):
        config = put({"rootfs": {"diff_ids": ids}})
        manifests.append({"digest": put({"config": {"digest": config}}), "platform": {"architecture": arch}})
    (tmp_path / "index.json").write_text(json.dumps({"manifests": [{"digest": put({"manifests": manifests})}]}))
    assert chart.diff_ids(tmp_path, Arch.AMD64) == ["sha256:a1", "sha256:a2"]
    assert chart.diff_ids(tmp_path, Arch.ARM64) == ["sha256:b1"]


def test_chain_id_follows_the_oci_rule():
    assert chain_id(["sha256:a"]) == "sha256:a"
    two = "sha256:" + hashlib.sha256(b"sha256:a sha256:b").hexdigest()
    assert chain_id(["sha256:a", "sha256:b"]) == two
    assert chain_id(["sha256:a", "sha256:b", "sha256:c"]) == "sha256:" + hashlib.sha256(
        f"{two} sha256:c".encode()).hexdigest()


def test_hosts_toml_trusts_the_ca_for_that_registry_only():
    text = hosts_toml("10.77.0.1:5000", Path("/x/ca.crt"))
    assert text.startswith('server = "https://10.77.0.1:5000"\n')
    assert '[host."https://10.77.0.1:5000"]' in text and 'ca = "/x/ca.crt"' in text


def test_the_hardware_names_the_charts_server_only_when_asked():
    common: dict[str, Any] = dict(mac="52:54:00:77:00:08", ip="10.77.0.18", netmask="255.255.255.0",
                                  gateway="10.77.0.1", hostname="captain-08", uefi=False)
    osie = kube.hardware("vm", **common, osie_url="http://10.77.0.1:7173")["spec"]["interfaces"][0]["netboot"]["osie"]
    assert osie == {"kernelParams": [], "baseURL": "http://10.77.0.1:7173"}
    assert "baseURL" not in kube.hardware("vm", **common)["spec"]["interfaces"][0]["netboot"]["osie"]
