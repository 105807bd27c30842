"""The lab's pure parts: namespace commands, Tinkerbell's command line and PKI files, the
Kubernetes objects, Smee's syslog records and the netboot timeline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from captainos.core import config, pins
from captainos.core.errors import CaptainError
from captainos.lab import agent, dnsmasq, kube, netns, other, qemu, registry, syslogd, tinkerbell, workflow
from captainos.lab import lab as lab_module
from captainos.lab.lab import Lab, Provision, State, smee_syslog
from captainos.lab.vm import Run, timeline

REPO = Path(__file__).resolve().parents[2]


def test_network_commands_make_a_bridge_and_nothing_else():
    net = netns.Network("lab")
    argvs = net.setup_argvs()
    assert argvs[0] == ["ip", "netns", "add", "captainos-lab"]
    assert ["ip", "-n", "captainos-lab", "addr", "add", "10.77.0.1/24", "dev", "br0"] in argvs
    bridge = next(a for a in argvs if "bridge" in a)
    assert bridge[bridge.index("address") + 1] == netns.BRIDGE_MAC  # never the lowest port's MAC
    # Nothing touches the host's interfaces, and no route is added.
    assert all(a[:3] == ["ip", "-n", "captainos-lab"] for a in argvs[1:])
    assert not any("route" in a for a in argvs)
    assert net.tap_argvs("tap1")[1] == ["ip", "-n", "captainos-lab", "link", "set", "tap1", "master", "br0"]
    assert net.host(1) == "10.77.0.11"
    with pytest.raises(CaptainError):
        net.host(0)
    # IPv6 beside IPv4 on the lab's bridge, and a bridge with IPv6 only.
    assert ["ip", "-n", "captainos-lab", "-6", "addr", "add", "fd77::1/64", "dev", "br0", "nodad"] in argvs
    assert ["ip", "-n", "captainos-lab", "-6", "addr", "add", "fd78::1/64", "dev", "br6", "nodad"] in argvs
    assert not any(a[3:5] == ["addr", "add"] and a[-1] == "br6" for a in argvs)  # no IPv4 there
    assert net.tap_argvs("tap9", net.only6_bridge)[1][-1] == "br6"


@pytest.mark.parametrize("name", ["", "Lab", "a/b", "x" * 32, "-x", "a b"])
def test_bad_lab_names_are_refused(name):
    with pytest.raises(CaptainError, match="bad lab name"):
        netns.Network(name)


def test_netns_runner_wraps_every_command():
    runner = netns.NetnsRunner(netns="captainos-x")
    argv, env, _cwd = runner.wrap(["skopeo", "copy", Path("/a")], {"K": "V"})
    assert argv == ["ip", "netns", "exec", "captainos-x", "skopeo", "copy", "/a"] and env == {"K": "V"}


def test_tinkerbell_command_line(tmp_path):
    certs = tinkerbell.Certs(tmp_path / "pki")
    argv = tinkerbell.argv(Path("/bin/tinkerbell"), certs=certs, address="10.77.0.1", state=tmp_path,
                           osie_url="http://10.77.0.1:8080", iso_url="http://10.77.0.1:8080/captainos-amd64.iso")

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    # The two gotchas of a namespace with no default route: name the API server's address.
    assert value("--advertise-address") == "10.77.0.1" and value("--kube-apiserver-bind-address") == "10.77.0.1"
    assert value("--public-ipv4") == "10.77.0.1" and value("--bind-address") == "10.77.0.1"
    assert value("--etcd-dir") == str(tmp_path / "etcd")
    assert value("--ipxe-http-script-osie-url") == "http://10.77.0.1:8080"
    assert value("--backend-kube-config") == str(certs.kubeconfig)
    assert "--iso-static-ipam-enabled" in argv and value("--iso-upstream-url").endswith("captainos-amd64.iso")
    assert "--enable-embedded-etcd=true" in argv and "--enable-crd-migrations=true" in argv
    no_iso = tinkerbell.argv(Path("/t"), certs=certs, address="10.77.0.1", state=tmp_path, osie_url="http://x")
    assert "--iso-enabled" not in no_iso


def test_server_certificate_names_the_lab_address():
    ext = tinkerbell.server_ext("10.77.0.1")
    assert "IP:10.77.0.1" in ext and "DNS:kubernetes.default.svc" in ext and "serverAuth" in ext


def test_kubeconfig_embeds_the_certificates(tmp_path):
    certs = tinkerbell.Certs(tmp_path)
    for path in (certs.ca, certs.admin, certs.admin_key):
        path.write_text(path.name)
    doc = tinkerbell.kubeconfig(certs, "10.77.0.1", 6443)
    assert doc["clusters"][0]["cluster"]["server"] == "https://10.77.0.1:6443"
    assert doc["users"][0]["user"]["client-key-data"] == "YWRtaW4ua2V5"  # base64 of "admin.key"


def test_hardware_object():
    hw = kube.hardware("vm-52-54-00-77-00-01", mac="52:54:00:77:00:01", ip="10.77.0.11", netmask="255.255.255.0",
                       gateway="10.77.0.1", hostname="captain-01", uefi=True, kernel_params=("a=b",))
    iface = hw["spec"]["interfaces"][0]
    assert hw["apiVersion"] == "tinkerbell.org/v1alpha1" and hw["kind"] == "Hardware"
    assert iface["dhcp"]["mac"] == "52:54:00:77:00:01" and iface["dhcp"]["ip"]["address"] == "10.77.0.11"
    assert iface["dhcp"]["uefi"] is True and iface["dhcp"]["hostname"] == "captain-01"
    assert iface["netboot"] == {"allowPXE": True, "allowWorkflow": True, "osie": {"kernelParams": ["a=b"]}}
    assert "name_servers" not in iface["dhcp"]
    hw = kube.hardware("vm", mac="m", ip="i", netmask="n", gateway="g", hostname="h", uefi=False,
                       nameservers=("10.77.0.1",))
    assert hw["spec"]["interfaces"][0]["dhcp"]["name_servers"] == ["10.77.0.1"]  # Smee's DHCP option 6


def test_template_keeps_tinkerbells_placeholders_and_every_field():
    variables = {"worker_id": "{{.device_1}}", "device_1": "{{.device_1}}", "registry": "10.77.0.1:5000",
                 "action_image": "10.77.0.1:5000/actions/busybox:e2e"}
    wf = workflow.load(REPO / "examples" / "workflow.yaml", variables)
    doc = yaml.safe_load(kube.template_data(wf))
    task = doc["tasks"][0]
    assert doc["name"] == "disk-pattern" and doc["version"] == "0.1" and doc["global_timeout"] > 0
    assert task["worker"] == "{{.device_1}}"  # Tinkerbell renders it from the Workflow's hardwareMap
    assert task["environment"]["DEST_DISK"] == "/dev/vda"
    actions = {a["name"]: a for a in task["actions"]}
    assert actions["write-pattern"]["volumes"] == ["/dev:/dev"] and actions["write-pattern"]["timeout"] == 120
    assert actions["host-network"]["namespaces"] == {"network": "host"}
    assert actions["host-network"]["environment"] == {"HOST_MAC": "{{.device_1}}"}
    assert actions["check-pattern"]["image"] == "10.77.0.1:5000/actions/busybox:e2e"


def test_workflow_object_maps_device_1_to_the_mac():
    obj = kube.workflow_object("w", template_name="t", hardware_name="h", mac="52:54:00:AA:00:01")
    assert obj["spec"] == {"templateRef": "t", "hardwareRef": "h", "hardwareMap": {"device_1": "52:54:00:aa:00:01"}}


def test_workflow_and_action_states():
    obj = {"status": {"state": "FAILED", "tasks": [{"actions": [{"name": "a", "state": "SUCCESS"},
                                                                  {"name": "b", "state": "FAILED"}]}]}}
    assert kube.workflow_state(obj) == "FAILED"
    assert kube.action_states(obj) == [("a", "SUCCESS"), ("b", "FAILED")]
    assert kube.workflow_state({}) == "" and kube.action_states({}) == []
    cond = {"status": {"conditions": [{"type": "TemplateRenderedSuccess", "status": "True", "reason": "x"}]}}
    assert kube.conditions(cond) == {"TemplateRenderedSuccess": "True"} and kube.conditions({}) == {}


def test_api_paths():
    assert kube.Client.path("workflows", "w1") == "/apis/tinkerbell.org/v1alpha1/namespaces/default/workflows/w1"
    assert kube.Client.path("events", group="v1") == "/api/v1/namespaces/default/events"


def test_smee_syslog_records_become_messages():
    records = [
        {"time": "x", "msg": "syslog message received",
         "syslog": {"hostname": "captain-01", "app-name": "tink-agent", "host": "10.77.0.11",
                    "msg": {"time": "t", "msg": "starting Agent"}}},
        {"time": "x", "msg": "sent DHCP response"},
    ]
    found = smee_syslog(records, [5.0, 6.0])
    assert len(found) == 1
    m = found[0]
    assert (m.hostname, m.app, m.peer, m.received) == ("captain-01", "tink-agent", "10.77.0.11", 5.0)
    assert json.loads(m.msg)["msg"] == "starting Agent"


def outcome(**kw) -> Run:
    base = dict(name="w", mac="52:54:00:77:00:01", index=1, state="SUCCESS", workflow={}, events=[], smee=[],
                syslog=[], firmware_console=[], console=[], http=[], started=1000.0, disk=Path("/d"))
    base.update(kw)
    return Run(**base)  # type: ignore[arg-type]


def test_timeline_marks_each_netboot_step():
    def agent(when: float, **line: str) -> syslogd.Message:
        return syslogd.Message(6, 6, 1, "", "captain-01", "tink-agent", "", "", "", json.dumps(line), "",
                               "10.77.0.11", when)

    syslog = [agent(1009.0, msg="starting Agent"), agent(1010.0, msg="received action"),
              agent(1010.5, msg="reported action status", state="running"),
              agent(1015.0, msg="reported action status", state="success")]
    # Record shapes as the real Smee logs them (v0.25.0).
    smee = [{"time": "1970-01-01T00:16:41Z", "msg": "sent DHCP response", "mac": "52:54:00:77:00:01", "type": "OFFER",
             "bootFileName": "http://10.77.0.1:7080/ipxe/script/52:54:00:77:00:01/auto.ipxe",
             "ipAddress": "10.77.0.11"},
            {"time": "1970-01-01T00:16:41.5Z", "msg": "file served", "filename": "52:54:00:77:00:01/undionly.kpxe"},
            {"time": "1970-01-01T00:16:42Z", "msg": "response", "method": "GET",
             "uri": "/ipxe/script/52:54:00:77:00:01/auto.ipxe", "client": "10.77.0.11", "code": 200}]
    out = outcome(smee=smee, syslog=syslog, http=[(1003.0, "GET /vmlinuz-x86_64")],
                  console=[(1010.0, "[    2.000000] Linux version")])
    marks = dict(timeline(out))
    assert marks["DHCP answered"] == 1.0 and marks["iPXE binary sent"] == 1.5 and marks["iPXE script served"] == 2.0
    assert marks["kernel fetched"] == 3.0 and marks["kernel started"] == 8.0
    assert marks["agent started"] == 9.0
    assert marks["first action started"] == 10.0 and marks["workflow done"] == 15.0
    assert dict(timeline(outcome(smee=smee, syslog=syslog[:3])))["workflow done"] is None


def test_a_dhcp_answer_for_another_mac_is_not_this_vms():
    smee = [{"time": "1970-01-01T00:16:41Z", "msg": "sent DHCP response", "mac": "52:54:00:77:00:02"}]
    assert dict(timeline(outcome(smee=smee)))["DHCP answered"] is None


def test_state_round_trip(tmp_path):
    state = State("lab", "/r", "captainos-lab", "10.77.0.1", "/out", "/k", "10.77.0.1:5000", pids={"http": 1})
    state.save(tmp_path / "lab.json")
    assert State.load(tmp_path / "lab.json") == state


def test_provision_macs_are_per_vm():
    assert Provision(workflow=Path("w"), index=1).mac == "52:54:00:77:00:01"
    assert Provision(workflow=Path("w"), index=12).mac == "52:54:00:77:00:0c"


def test_missing_artifacts_are_one_line_and_nothing_starts(tmp_path):
    cfg = config.Config(cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    lab = Lab(cfg, name="t1", root=tmp_path / "lab")
    with pytest.raises(CaptainError, match="has no vmlinuz-x86_64, initramfs-x86_64") as err:
        lab.up()
    assert "--extra-ca-certs" in (err.value.hint or "")
    assert not netns.exists("captainos-t1") and not (tmp_path / "lab").exists()


def test_the_lab_is_amd64_only(tmp_path):
    with pytest.raises(CaptainError, match="amd64"):
        Lab(config.Config(arch=config.Arch.ARM64, cache_dir=tmp_path), name="t2")


def test_tinkerbell_build_joins_api_and_quamina():
    replaced = dict(agent.TINKERBELL.replaces)
    assert replaced["quamina.net/go/quamina"] is pins.QUAMINA
    assert replaced[pins.TINK_AGENT_API.path] is pins.TINK_AGENT_API
    argv = agent.build_argv("go", Path("/o/tinkerbell"), agent.TINKERBELL)
    assert argv == ["go", "build", "-tags=embedded", "-trimpath", "-ldflags=-s -w", "-o", "/o/tinkerbell",
                    "./cmd/tinkerbell"]


def test_what_every_vm_of_a_lab_boots_with(tmp_path):
    """Smee's extra kernel arguments: the agent image; in a lab with credentials the registry,
    the credentials and loglevel=4 (Debian's kernel prints its command line at notice level)."""
    cfg = config.Config(cache_dir=tmp_path)
    plain = Lab(cfg, name="t3").extra_kernel_args("10.77.0.1:5000", "")
    assert plain == ["tink_worker_image=10.77.0.1:5000/tink-agent:v0.25.0", "captainos.selftest=off"]
    lab = Lab(cfg, name="t4", auth=True)
    args = lab.extra_kernel_args("10.77.0.1:5000", "10.77.0.1:5001")
    assert args[:3] == ["loglevel=4", "docker_registry=10.77.0.1:5001", "registry_username=captain"]
    assert f"registry_password={lab.password}" in args
    assert not any(a.startswith("tink_worker_image=") for a in args)  # it would win over docker_registry


def pending_lab(tmp_path: Path) -> tuple[Lab, SimpleNamespace]:
    """A lab whose one Workflow stays PENDING, and a guest that keeps running: _follow ends only
    by a console line or its timeout."""
    class Client:
        def get(self, kind, name):
            return {"status": {"state": "STATE_PENDING"}}

    lab = Lab(config.Config(cache_dir=tmp_path / "cache", out_dir=tmp_path / "out"), name="t1", root=tmp_path / "lab")
    lab.client = Client()  # type: ignore[assignment]
    return lab, SimpleNamespace(proc=None, workdir=tmp_path / "qemu")


def test_a_console_line_to_give_up_on_ends_the_run_at_once(tmp_path):
    """The RAM benchmark's probes stop at the first sign that memory ran out instead of
    waiting for the workflow's timeout."""
    from captainos.lab import bench

    lab, guest = pending_lab(tmp_path)
    console = SimpleNamespace(lines=[(0.0, "[  1.0] booting"),
                                     (1.0, "[ 112.56] Out of memory: Killed process 237 (systemd-resolve)")])
    plan = Provision(workflow=Path("w"), timeout=60, give_up=bench.RAM_GIVE_UP)
    with pytest.raises(CaptainError, match=r"console says: \[ 112.56\] Out of memory: Killed process 237"):
        lab._follow("wf", guest, plan, 0.0, console)  # type: ignore[arg-type]
    quiet = Provision(workflow=Path("w"), timeout=0)  # nothing to give up on: the timeout ends it
    with pytest.raises(CaptainError, match="still"):
        lab._follow("wf", guest, quiet, 0.0, SimpleNamespace(lines=console.lines))  # type: ignore[arg-type]


def test_follow_shows_captainos_console_notes_as_they_come(tmp_path, capsys):
    """The agent setup's console line (an untrusted registry, ...) is shown while the run waits,
    not found afterwards in a console log."""
    lab, guest = pending_lab(tmp_path)
    note = ("captainos: tink-agent-setup: cannot pull 10.77.0.1:5000/tink-agent:v0.25.0: the registry certificate "
            "is not trusted: add its CA or list it in insecure_registries; retrying every 60s at most")
    console = SimpleNamespace(lines=[(100.0, "[  1.0] booting"), (131.5, note), (132.0, "[ 33.1] other")])
    with pytest.raises(CaptainError, match="still"):
        lab._follow("wf", guest, Provision(workflow=Path("w"), timeout=0), 100.0, console)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert f"31.5s  console: {note}" in err and "booting" not in err


def _initramfs(path: Path, bundle: bytes) -> Path:
    import io

    from captainos.stages import cpio
    out = io.BytesIO()
    writer = cpio.Writer(out)
    writer.add("etc/ssl/certs/ca-certificates.crt", 0o100644, bundle)
    writer.close()
    path.write_bytes(out.getvalue())
    return path


def _pem(body: str) -> bytes:
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


def test_lab_up_refuses_an_image_that_does_not_trust_the_labs_ca(tmp_path):
    from captainos.lab import registry
    from captainos.stages import artifacts
    cfg = config.Config(cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    cfg.out_dir.mkdir()
    ca = registry.CA(tmp_path / "ca")
    ca.root.mkdir()
    ca.cert.write_bytes(_pem("QUJD" * 40))
    lab = Lab(cfg, name="t1", root=tmp_path / "lab")
    with pytest.raises(CaptainError, match="has no") as missing:
        lab.check_artifacts(ca)
    assert f"--extra-ca-certs {ca.cert}" in str(missing.value.hint)
    for name in artifacts.smee_links(cfg.arch):
        (cfg.out_dir / name).write_bytes(b"")
    initramfs = cfg.out_dir / artifacts.initramfs_name(cfg.arch)
    _initramfs(initramfs, _pem("WFla" * 40) + _pem("TU5P" * 30))
    with pytest.raises(CaptainError, match="does not trust the lab's CA") as refused:
        lab.check_artifacts(ca)
    assert f"./build.py --out-dir {cfg.out_dir.resolve()} --extra-ca-certs {ca.cert}" in str(refused.value.hint)
    _initramfs(initramfs, _pem("WFla" * 40) + _pem("QUJD" * 40))  # the bundle's lines need not match the file's
    lab.check_artifacts(ca)


def test_lab_run_on_a_running_lab_refuses_an_out_rebuilt_without_the_ca(tmp_path, monkeypatch):
    """`lab up` checked the image it serves; an out/ rebuilt after it is checked again by `lab run`
    before any VM boots."""
    import argparse

    from captainos.lab import cli as lab_cli
    from captainos.lab import registry
    from captainos.stages import artifacts
    cfg = config.Config(cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    cfg.out_dir.mkdir()
    for name in artifacts.smee_links(cfg.arch):
        (cfg.out_dir / name).write_bytes(b"")
    _initramfs(cfg.out_dir / artifacts.initramfs_name(cfg.arch), _pem("WFla" * 40))
    ca = registry.CA(tmp_path / "ca")
    ca.root.mkdir()
    ca.cert.write_bytes(_pem("QUJD" * 40))
    booted: list[object] = []

    class Running(Lab):
        def provision(self, plan, workdir):
            booted.append(plan)

    monkeypatch.setattr(lab_cli, "lab_dir", lambda cfg, name: tmp_path)
    (tmp_path / "lab.json").write_text("{}")
    monkeypatch.setattr(lab_cli.Lab, "attach", staticmethod(lambda cfg, name: Running(cfg, name=name,
                                                                                      root=tmp_path / "lab")))
    monkeypatch.setattr(lab_cli.registry, "ensure_ca", lambda cache, runner: ca)
    workflow_file = tmp_path / "w.yaml"
    workflow_file.write_text("name: w\n")
    args = argparse.Namespace(workflow=str(workflow_file), name="t", ipv6="", boot="uefi", vm=12, timeout=5.0,
                              chart=False)
    with pytest.raises(CaptainError, match="does not trust the lab's CA") as refused:
        lab_cli.run(cfg, args)
    assert f"--extra-ca-certs {ca.cert}" in str(refused.value.hint) and not booted


def test_lab_ca_makes_the_ca_once_and_prints_its_path(tmp_path, capsys):
    import argparse

    from captainos.lab import cli as lab_cli
    cfg = config.Config(cache_dir=tmp_path / "cache")
    lab_cli.main(cfg, argparse.Namespace(action="ca"))
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "cache/e2e-ca/ca.pem" and b"BEGIN CERTIFICATE" in path.read_bytes()
    first = path.read_bytes()
    lab_cli.main(cfg, argparse.Namespace(action="ca"))
    assert capsys.readouterr().out.strip() == str(path) and path.read_bytes() == first  # kept, not remade


def test_a_side_network_is_joined_to_the_lab_by_a_bridge_without_an_address():
    """The lab's namespace holds no address on a VM's other network: only the VM could carry a
    packet from one to the other."""
    side = netns.SideNetwork(netns.Network("lab"), 2)
    argvs = side.setup_argvs()
    assert side.netns == "captainos-lab-o2" and side.address == "10.88.2.1"
    assert ["ip", "-n", "captainos-lab-o2", "addr", "add", "10.88.2.1/24", "dev", "eth0"] in argvs
    in_lab = [a for a in argvs if a[:3] == ["ip", "-n", "captainos-lab"]]
    assert not any("addr" in a or "route" in a for a in in_lab), in_lab
    assert ["ip", "-n", "captainos-lab", "link", "set", "to2", "master", "bo2"] in argvs
    assert not any("route" in a for a in argvs)


def test_dnsmasq_reads_nothing_but_its_options_and_forwards_nothing(tmp_path):
    server = dnsmasq.Server("ns", "10.88.2.1", tmp_path, records={"tinkerbell.lab": "10.88.2.1"},
                            dhcp=dnsmasq.Dhcp("10.88.2.100", "10.88.2.150", "10.88.2.1", "10.88.2.1", hostname="x"))
    argv = server.argv()
    for flag in ("--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--listen-address=10.88.2.1",
                 "--bind-interfaces", "--host-record=tinkerbell.lab,10.88.2.1", "--local=/tinkerbell.lab/",
                 "--dhcp-option=option:router,10.88.2.1", "--dhcp-option-force=12,x"):
        assert flag in argv, flag
    assert not any(a.startswith("--server") for a in argv)
    assert not any(a.startswith("--dhcp") for a in dnsmasq.Server("ns", "10.77.0.1", tmp_path).argv())
    server.lease_file.write_text("1767225600 52:54:00:88:00:02 10.88.2.117 other-network 01:52:54:00:88:00:02\n")
    assert server.leases() == {"52:54:00:88:00:02": "10.88.2.117"}
    server.log_file.write_text("dnsmasq[9]: query[A] tinkerbell.lab from 10.88.2.117\n"
                               "dnsmasq[9]: config tinkerbell.lab is 10.88.2.1\n")
    assert server.queries() == ["tinkerbell.lab"]


def nft_accepts(ruleset: str) -> None:
    """nft's own check of a ruleset (--check: parsed and validated by the kernel, nothing
    applied), in a network namespace of its own; skipped where that cannot be made."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs root and nft")
    result = subprocess.run(["unshare", "--net", "nft", "--check", "-f", "-"], input=ruleset, text=True,
                            capture_output=True, check=False)
    assert result.returncode == 0, f"{result.stderr}\n{ruleset}"


def test_the_other_networks_counters_watch_its_router_and_the_lab():
    side = netns.SideNetwork(netns.Network("lab"), 3)
    rules = other.side_rules(side)
    assert 'ip saddr 10.88.3.0/24 ip protocol tcp counter name "tcp_packets"' in rules
    assert 'udp dport 514 counter name "syslog_packets"' in rules
    assert 'iifname "br0" ip saddr 10.88.3.0/24 counter name "crossed"' in other.lab_rules(side)
    for ruleset in (rules, other.lab_rules(side)):
        nft_accepts(ruleset)
    args = other.Other.make(side.lab, 3, Path("/w"), ("tinkerbell.lab",)).qemu_args("52:54:00:88:00:03")
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:88:00:03,romfile=" in args  # no option ROM: never netboots


def test_the_boot_nic_can_take_a_high_pci_slot():
    machine = qemu.Machine(config.Arch.AMD64, mac="52:54:00:77:00:02", net_boot=True, nic_slot=0x10)
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:02,bootindex=0,addr=0x10" in qemu.argv(machine)
    assert not any("addr=" in a for a in qemu.argv(qemu.Machine(config.Arch.AMD64)))


def dnsmasq_accepts(argv: list[str]) -> None:
    """dnsmasq's own syntax check of an argv (nothing started)."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq (dnsmasq-base)")
    result = subprocess.run([*argv, "--test"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_dnsmasq_argvs_pass_its_own_check(tmp_path):
    side = other.Other.make(netns.Network("lab"), 2, tmp_path, ("tinkerbell.lab",))
    dnsmasq_accepts(side.dns.argv())
    lab = dnsmasq.Server("ns", "10.77.0.1", tmp_path, records={"tinkerbell.lab": "10.77.0.1", "t6.lab": "fd77::1"},
                         also=("fd77::1", "fd78::1"),
                         ipv6=(dnsmasq.Ipv6("fd77::", "br0"), dnsmasq.Ipv6("fd78::", "br6", stateful=True)))
    argv = lab.argv()
    dnsmasq_accepts(argv)
    for flag in ("--listen-address=fd77::1", "--listen-address=fd78::1", "--enable-ra",
                 "--dhcp-range=fd77::,ra-stateless,64,1h", "--dhcp-range=fd78::100,fd78::1ff,64,1h",
                 "--ra-param=br6,10,1800", "--host-record=t6.lab,fd77::1", "--interface=br0", "--interface=br6",
                 "--bind-dynamic"):
        assert flag in argv, flag
    assert not any(a.startswith("--dhcp-range=10.") for a in argv)  # Smee is the lab's DHCPv4 server
    lab.lease_file.write_text("1767225600 52:54:00:77:00:01 10.77.0.11 x *\nduid 00:01:00:01:aa\n"
                              "1767225600 1234 fd78::1a7 vm 00:04:ab\n")
    assert lab.addresses6() == ["fd78::1a7"] and lab.leases() == {"52:54:00:77:00:01": "10.77.0.11"}


def test_ipv6_counters_count_one_vm_by_version():
    rules = lab_module.watch6_rules("52:54:00:77:00:07", "captainos_v6_7")
    assert 'ether saddr 52:54:00:77:00:07 meta nfproto ipv4 tcp dport 42113 counter name "grpc4"' in rules
    assert 'ether saddr 52:54:00:77:00:07 meta nfproto ipv6 udp dport 514 counter name "syslog6"' in rules
    nft_accepts(rules)


def test_a_direct_boot_gets_the_command_line_smee_would_send():
    line = lab_module.direct_cmdline(mac="52:54:00:77:00:09", grpc="tinkerbell6.lab:42113",
                                     syslog_host="tinkerbell6.lab", agent_image="tinkerbell6.lab:5000/a:b")
    words = line.split()
    for word in ("grpc_authority=tinkerbell6.lab:42113", "syslog_host=tinkerbell6.lab", "worker_id=52:54:00:77:00:09",
                 "hw_addr=52:54:00:77:00:09", "tink_worker_image=tinkerbell6.lab:5000/a:b", "console=ttyS1,115200",
                 "tinkerbell_tls=false"):
        assert word in words, word
    assert words[-1] == "captainos.selftest=off"


def test_an_ipv6_only_plan_must_boot_directly(tmp_path):
    lab = Lab(config.Config(), name="t", root=tmp_path)
    lab.state = State("t", str(tmp_path), "ns", "10.77.0.1", str(tmp_path), "k", "10.77.0.1:5000")
    lab.client = SimpleNamespace()
    with pytest.raises(CaptainError, match="IPv6-only network is booted directly"):
        lab.provision(Provision(workflow=tmp_path / "w.yaml", boot="uefi", ipv6="ipv6-only"))
    with pytest.raises(CaptainError, match="unknown IPv6 kind"):
        lab.provision(Provision(workflow=tmp_path / "w.yaml", ipv6="v6"))
    assert lab.registry_host("netboot-then-ipv6") == "[fd77::1]:5000"
    assert lab.registry_host("ipv6-only") == "tinkerbell6.lab:5000"


def test_the_syslog_receiver_takes_ipv6_and_writes_json_lines(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with syslogd.Receiver(bind="::1") as rx:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"<14>1 2026-12-05T00:00:00Z vm tink-agent 1 - - hello", ("::1", rx.port))
        got = rx.wait_for(lambda m: m.msg == "hello", 5)
    assert got is not None and got.peer.startswith("[::1]:") and got.hostname == "vm"
    out = tmp_path / "s.jsonl"
    out.write_text(json.dumps(got.to_json()) + "\n")
    assert syslogd.read_lines(out) == [got] and syslogd.read_lines(out, out.stat().st_size) == []


def test_the_relay_carries_ipv6_connections_to_the_ipv4_service(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen()
        target = service.getsockname()[1]
        port = registry.free_port()
        log_file = tmp_path / "relay.log"
        with log_file.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "captainos.lab.relay", "--port", str(port), "--to",
                                     f"127.0.0.1:{target}"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while "relaying" not in log_file.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            with socket.create_connection(("::1", port), timeout=5) as client:
                conn, _ = service.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
                    conn.sendall(b"pong")
                    assert client.recv(4) == b"pong"
        finally:
            proc.terminate()
            proc.wait(5)
    assert "connection from ::1" in log_file.read_text()


@pytest.mark.parametrize("state", ["SUCCESS", "FAILED", "raises"])
def test_lab_run_keeps_a_runs_files_only_when_it_did_not_succeed(tmp_path, monkeypatch, capsys, state):
    """The consoles and the disk of a run that failed are where its cause is: kept and named;
    a SUCCESS leaves nothing in the temporary directory."""
    import argparse
    import tempfile

    from captainos.core import log as core_log
    from captainos.lab import cli as lab_cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    workflow_file = tmp_path / "w.yaml"
    workflow_file.write_text("name: w\n")
    lines: list[str] = []
    monkeypatch.setattr(core_log, "info", lines.append)

    class Attached:
        def check_artifacts(self, ca):
            assert ca == "the lab's CA"

        def provision(self, plan, workdir):
            (workdir / "serial1.log").write_text("the OS console\n")
            if state == "raises":
                raise CaptainError("workflow w still PENDING after 5s")
            return outcome(state=state)

    monkeypatch.setattr(lab_cli, "lab_dir", lambda cfg, name: tmp_path)
    (tmp_path / "lab.json").write_text("{}")
    monkeypatch.setattr(lab_cli.Lab, "attach", staticmethod(lambda cfg, name: Attached()))
    monkeypatch.setattr(lab_cli.registry, "ensure_ca", lambda cache, runner: "the lab's CA")
    args = argparse.Namespace(workflow=str(workflow_file), name="t", ipv6="", boot="uefi", vm=12, timeout=5.0,
                              chart=False)
    if state == "SUCCESS":
        lab_cli.run(config.Config(cache_dir=tmp_path / "cache"), args)
        assert not list(tmp_path.glob("captainos-lab-t-*")) and not lines
        return
    with pytest.raises(CaptainError):
        lab_cli.run(config.Config(cache_dir=tmp_path / "cache"), args)
    [kept] = tmp_path.glob("captainos-lab-t-*")
    assert (kept / "serial1.log").read_text() == "the OS console\n"
    assert lines == [f"    kept the run's consoles, disk and Workflow object in {kept}"]
