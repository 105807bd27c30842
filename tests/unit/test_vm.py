"""What both harnesses share (vm.py): the action image's busybox, the console, the agent's log
lines, and one result and timeline for a run of either (the timeline's expected numbers for each
harness are in test_e2e.py and test_lab.py)."""

import json
import time
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.errors import CaptainError
from captainos.lab import syslogd, vm

START = 1000.0


def agent_message(when: float, app: str = "tink-agent", **line: object) -> syslogd.Message:
    """An agent line as the lab gets it from Smee: the object re-encoded, its keys sorted."""
    return syslogd.Message(6, 6, 1, "", "captain-01", app, "", "", "", json.dumps(line, sort_keys=True), "",
                           "10.77.0.11", when)


def test_the_agents_lines_are_read_in_every_form_they_arrive_in():
    own = json.dumps({"time": "2026-11-25T17:31:08Z", "level": 0, "msg": "received action", "action": {"name": "a"}})
    # On the console or in syslog, after a prefix; as Smee logs it, keys sorted.
    assert (vm.agent_json(f"tink-agent[42]: {own}") or {}).get("action") == {"name": "a"}
    smee = json.dumps({"action": {"name": "a"}, "level": 0, "msg": "received action", "time": "x"})
    assert (vm.agent_json(smee) or {}).get("msg") == "received action"
    assert vm.agent_json('{"level":"info","prog":"init","msg":"starting systemd"}') is None  # not the agent's
    assert vm.agent_json('tink-agent: {"msg": "received action"') is None
    assert vm.agent_json("plain text") is None


def test_the_console_follows_a_growing_file_line_by_line(tmp_path):
    path = tmp_path / "serial.log"
    console = vm.Console(path).start()
    try:
        path.write_bytes(b"one\r\ntw")
        deadline = time.monotonic() + 5
        while not console.lines and time.monotonic() < deadline:
            time.sleep(0.05)
        with path.open("ab") as handle:
            handle.write(b"o\nthree")
        while len(console.lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        console.stop()
    assert [line for _, line in console.lines] == ["one", "two"]  # "three" is not complete yet
    assert vm.first_line(console.lines, r"^tw") == console.lines[1]


def lab_run(**kw) -> vm.Run:
    base = dict(name="w", state="SUCCESS", console=[], syslog=[], started=START, disk=Path("/d"),
                mac="52:54:00:77:00:01", index=1, smee=[{"time": "1970-01-01T00:16:41Z", "msg": "sent DHCP response",
                                                         "mac": "52:54:00:77:00:01", "ipAddress": "10.77.0.11"}])
    base.update(kw)
    return vm.Run(**base)  # type: ignore[arg-type]


def test_a_netboot_run_has_the_netboot_and_the_oss_marks():
    """Through Smee: power on, the netboot, then the OS's steps from its console; network up by
    the OS's first syslog message, not iPXE's before the kernel."""
    run = lab_run(
        syslog=[agent_message(1002.0, app="ipxe", msg="iPXE says hello"), agent_message(1020.0, msg="starting Agent"),
                agent_message(1021.0, msg="received action"),
                agent_message(1030.0, msg="reported action status", state="success")],
        http=[(1004.0, "GET /vmlinuz-x86_64")],
        console=[(1010.0, "[    2.000000] Linux version"),
                 (1012.0, '[  3.2] {"level":"info","prog":"init","msg":"root moved; starting systemd"}'),
                 (1013.0, "[  5.1] systemd[1]: Welcome"),
                 (1025.0, "[  OK  ] Reached target network-online.target - Network is Online.")])
    marks = vm.timeline(run)
    assert [label for label, _ in marks] == [
        "power on", "DHCP answered", "iPXE binary sent", "iPXE script served", "kernel fetched", "kernel started",
        "/init starts systemd", "systemd up", "network up", "agent started", "first action started", "workflow done"]
    assert dict(marks) == {
        "power on": 0.0, "DHCP answered": 1.0, "iPXE binary sent": None, "iPXE script served": None,
        "kernel fetched": 4.0, "kernel started": 8.0, "/init starts systemd": 12.0, "systemd up": 13.0,
        "network up": 20.0, "agent started": 20.0, "first action started": 21.0, "workflow done": 30.0}


def test_a_netboot_whose_kernel_was_not_seen_takes_no_syslog_for_the_network():
    run = lab_run(syslog=[agent_message(1002.0, app="ipxe", msg="iPXE says hello")])
    assert dict(vm.timeline(run))["network up"] is None


def test_the_kernel_on_the_firmware_console_counts():
    """The ISO's console set leaves the kernel's lines on ttyS0."""
    run = lab_run(firmware_console=[(1001.0, "BdsDxe: loading"), (1009.0, "[    1.500000] Linux version")],
                  console=[(1015.0, "[  OK  ] Reached target network-online.target - Network is Online.")])
    marks = dict(vm.timeline(run))
    assert marks["kernel started"] == 7.5 and marks["network up"] == 15.0


def test_a_run_of_the_model_server_has_no_netboot_marks():
    run = vm.Run(name="default/x", state="SUCCESS", console=[(START + 3, "[    2.000000] x")], syslog=[],
                 started=START, disk=Path("/d"),
                 records=[{"kind": "served", "time": "1970-01-01T00:16:50+00:00", "action": "a", "state": None}])
    marks = dict(vm.timeline(run))
    assert marks["QEMU started"] == 0.0 and "power on" not in marks and "DHCP answered" not in marks
    assert marks["kernel started"] == 1.0 and marks["first action received"] == 10.0
    assert "first action started" not in marks and marks["workflow done"] is None


def test_the_report_shows_the_workflows_actions_or_else_the_agents_log():
    workflow = {"status": {"state": "SUCCESS", "tasks": [{"actions": [{"name": "write", "state": "SUCCESS"}]}]}}
    lab = lab_run(workflow=workflow, syslog=[agent_message(1021.0, msg="received action", action={"name": "write"})],
                  other={"lease": "10.88.2.10", "queries": ["x"]})
    lab.timeline = vm.timeline(lab)
    text = lab.report()
    assert text.startswith("workflow w (52:54:00:77:00:01): SUCCESS; conditions: none\nactions:\n  write ")
    assert "timeline (seconds after power on):" in text and "other network: lease=10.88.2.10" in text
    assert "agent log:" not in text and "queries" not in text
    model = vm.Run(name="default/x", state="SUCCESS", console=[], started=START, disk=Path("/d"),
                   syslog=[agent_message(1021.0, msg="received action", action={"name": "write"})])
    model.timeline = vm.timeline(model)
    text = model.report()
    assert text.startswith("workflow default/x: SUCCESS\nagent log:\n     21.0s  received action  action=write")
    assert "timeline (seconds after QEMU started):" in text and "actions:" not in text


def test_the_action_busybox_is_the_hosts_on_the_hosts_architecture():
    from captainos.lab import oci

    cfg = config.load(env={"ARCH": "amd64"})
    assert vm.action_busybox(cfg, runner=None) == oci.BUSYBOX  # type: ignore[arg-type]


def test_the_action_busybox_of_another_architecture_comes_from_debian(tmp_path, monkeypatch):
    from captainos.sources import debian

    cfg = config.load(env={"ARCH": "arm64", "CAPTAINOS_CACHE": str(tmp_path / "cache")})
    deb = tmp_path / "busybox-static_1.37.0-6_arm64.deb"
    deb.write_bytes(b"a deb")
    asked = []

    def package(name, arch, **kwargs):
        asked.append((name, arch))
        return deb

    def extract(runner, path, dest):
        assert path == deb
        asked.append(("extract", dest.name))
        (dest / "usr/bin").mkdir(parents=True)
        (dest / "usr/bin/busybox").write_bytes(b"\x7fELF arm64 busybox")

    monkeypatch.setattr(debian, "package", package)
    monkeypatch.setattr(debian, "extract", extract)
    found = vm.action_busybox(cfg, runner=None)  # type: ignore[arg-type]
    assert asked == [("busybox-static", "arm64"), ("extract", "root")]
    assert found.read_bytes() == b"\x7fELF arm64 busybox"
    assert vm.action_busybox(cfg, runner=None) == found  # type: ignore[arg-type]
    # The index is asked each time; the extraction is cached by the package's digest.
    assert asked[2:] == [("busybox-static", "arm64")]


def test_a_busybox_package_without_busybox_is_refused(tmp_path, monkeypatch):
    from captainos.sources import debian

    cfg = config.load(env={"ARCH": "arm64", "CAPTAINOS_CACHE": str(tmp_path / "cache")})
    deb = tmp_path / "busybox-static_arm64.deb"
    deb.write_bytes(b"a deb")
    monkeypatch.setattr(debian, "package", lambda name, arch, **kwargs: deb)
    monkeypatch.setattr(debian, "extract", lambda runner, path, dest: dest.mkdir(parents=True))
    with pytest.raises(CaptainError, match="holds no busybox binary"):
        vm.action_busybox(cfg, runner=None)  # type: ignore[arg-type]
