"""The `qemu-test --workflow` harness's pure parts: command line, console parsing, timeline, leak finder."""

import json
import time
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.errors import CaptainError
from captainos.lab import e2e, syslogd, vm

MAC = "52:54:00:12:34:56"


def test_cmdline_with_full_agent_image():
    line = e2e.Cmdline("10.0.2.2:42113", MAC, 5514, agent_image="10.0.2.2:5000/tink-agent:v0.25.0").render()
    assert line.split() == [
        "tink_worker_image=10.0.2.2:5000/tink-agent:v0.25.0", "grpc_authority=10.0.2.2:42113",
        f"worker_id={MAC}", "tinkerbell_tls=false", "syslog_host=10.0.2.2", "syslog_port=5514",
        "facility=onprem", f"hw_addr={MAC}", "captainos.selftest=off"]
    assert "registry_" not in line and "docker_registry" not in line


def test_cmdline_with_registry_credentials():
    cmd = e2e.Cmdline("10.0.2.2:1", MAC, 2, docker_registry="10.0.2.2:5001", username="captain",
                      password="pw=with=equals", extra="foo=bar")
    words = cmd.render().split()
    assert "docker_registry=10.0.2.2:5001" in words and "registry_username=captain" in words
    assert "registry_password=pw=with=equals" in words and words[-1] == "foo=bar"
    assert not any(w.startswith("tink_worker_image=") for w in words)
    assert "pw=with=equals" not in repr(cmd)


def agent_line(msg, **extra):
    return json.dumps({"time": "2026-11-25T17:31:08Z", "level": 0, "msg": msg, **extra})


def make_result(start):
    records = [
        {"kind": "served", "time": "2026-11-25T17:00:30+00:00", "action": "a", "state": None},
        {"kind": "report", "time": "2026-11-25T17:00:31+00:00", "action": "a", "state": "RUNNING",
         "workflow_state": "RUNNING"},
        {"kind": "report", "time": "2026-11-25T17:00:40+00:00", "action": "a", "state": "SUCCESS",
         "workflow_state": "SUCCESS"},
    ]
    syslog = [
        syslogd.parse(f"<14>1 - captainos tink-agent 7 - - {agent_line('starting Agent')}", received=start + 20),
        syslogd.parse("<14>1 - captainos tink-agent 7 - - " + agent_line("received action", action={"name": "a"}),
                      received=start + 30.5),
        syslogd.parse("<14>1 - captainos tink-agent 7 - - " + agent_line(
            "reported action status", action={"name": "a"}, state="success"), received=start + 40.5),
        syslogd.parse("<14>1 - captainos kernel - - - unrelated", received=start + 16),
    ]
    console = [(start + 0.5, "SeaBIOS (version 1.16.2)"), (start + 3, "[    2.000000] mtrr: inconsistent"),
               (start + 4, '[  3.2] {"level":"info","prog":"init","msg":"root moved; starting systemd"}'),
               (start + 6, "[  5.1] systemd[1]: Welcome"),
               (start + 15, "[  OK  ] Reached target network-online.target - Network is Online.")]
    return vm.Run(name="default/x", state="SUCCESS", records=records, syslog=syslog, console=console, started=start,
                  disk=Path("/disk"))


def test_timeline_and_report():
    from datetime import datetime

    start = datetime.fromisoformat("2026-11-25T17:00:00+00:00").timestamp()
    result = make_result(start)
    result.timeline = vm.timeline(result)
    assert dict(result.timeline) == {
        "QEMU started": 0.0, "kernel started": 1.0, "/init starts systemd": 4.0, "systemd up": 6.0,
        "network up": 15.0, "agent started": 20.0, "first action received": 30.0, "workflow done": 40.0}
    assert result.reports() == [("a", "RUNNING"), ("a", "SUCCESS")] and result.served() == ["a"]
    text = result.report()
    assert "received action  action=a" in text and "reported action status  action=a state=success" in text
    assert "workflow done" in text and "40.0s" in text


def test_network_is_up_by_the_first_syslog_message_whatever_the_console_says():
    from datetime import datetime

    start = datetime.fromisoformat("2026-11-25T17:00:00+00:00").timestamp()
    result = make_result(start)
    # No start-up line on the console, only the shutdown's: the syslog stream decides.
    result.console[-1] = (start + 90, "[  OK  ] Stopped target network-online.target - Network is Online.")
    assert dict(vm.timeline(result))["network up"] == 16.0
    result.syslog[-1] = syslogd.parse("<14>1 - captainos kernel - - - early", received=start + 12)
    result.console[-1] = (start + 15, "[  OK  ] Reached target network-online.target - Network is Online.")
    assert dict(vm.timeline(result))["network up"] == 12.0


def test_timeline_marks_what_never_happened():
    result = vm.Run(name="default/x", state="RUNNING", console=[], syslog=[], started=time.time(), disk=Path("/disk"))
    marks = dict(vm.timeline(result))
    assert marks["QEMU started"] == 0.0 and marks["workflow done"] is None and marks["network up"] is None
    result.timeline = vm.timeline(result)
    assert "workflow done              -" in result.report()


def test_agent_lines_fall_back_to_the_console():
    start = time.time()
    line = "tink-agent[42]: " + agent_line("received action", action={"name": "z"})
    result = vm.Run(name="w", state="SUCCESS", console=[(start + 3, line), (start + 4, "{not json")], syslog=[],
                    started=start, disk=Path("/d"))
    assert [obj["action"]["name"] for _, obj in result.agent_lines()] == ["z"]


def test_secret_leaks_finds_every_place():
    start = time.time()
    secret = "pw-s3cret"
    result = vm.Run(name="w", state="SUCCESS",
                    syslog=[syslogd.parse(f"<14>1 - vm kernel - - - Command line: x={secret}")],
                    console=[(start, f"Kernel command line: registry_password={secret}"), (start, "clean")],
                    started=start, disk=Path("/d"))
    leaks = e2e.secret_leaks(result, json.dumps([{"message": secret}]), secret)
    assert len(leaks) == 3 and not any(secret in leak for leak in leaks)
    assert leaks[0].startswith("serial:") and leaks[1].startswith("syslog from vm/kernel")
    assert e2e.secret_leaks(result, "[]", "") == []


def test_the_harness_refuses_a_missing_image_with_a_hint(tmp_path):
    cfg = config.Config(cache_dir=tmp_path / "cache")
    plan = e2e.Plan(workflow=tmp_path / "wf.yaml", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd")
    with pytest.raises(CaptainError) as info, e2e.Harness(cfg, plan, workdir=tmp_path / "harness"):
        pass
    assert "does not exist" in info.value.message and "--extra-ca-certs" in (info.value.hint or "")
    assert "e2e-ca/ca.pem" in (info.value.hint or "")


def test_plan_hides_the_password():
    plan = e2e.Plan(workflow=Path("w"), kernel=Path("k"), initrd=Path("i"), password="hidden-pw")
    assert "hidden-pw" not in repr(plan)


def test_the_harness_gives_up_when_the_guest_says_the_agent_cannot_start(tmp_path):
    cfg = config.Config(cache_dir=tmp_path / "cache")
    plan = e2e.Plan(workflow=tmp_path / "w", kernel=tmp_path / "k", initrd=tmp_path / "i")
    harness = e2e.Harness(cfg, plan, workdir=tmp_path / "harness")
    harness.console = vm.Console(tmp_path / "serial.log")
    harness.syslog = syslogd.Receiver()
    harness.console.lines = [(0.0, "[  OK  ] Started containerd.service")]
    assert harness._fatal() is None
    harness.syslog.messages.append(syslogd.parse(
        "<14>1 - vm tink-agent - - - Dependency failed for tink-agent.service - Tinkerbell agent."))
    assert harness._fatal() == "Dependency failed for tink-agent.service - Tinkerbell agent."
