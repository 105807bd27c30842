"""End-to-end provisioning: CaptainOS boots in QEMU, pulls the real tink-agent and runs workflows.

Each scenario boots the same image (session fixture in conftest.py) against a fresh Lab:
TLS registries, the workflow server, the syslog receiver. Run with
`python3 -m pytest -m e2e tests/e2e -s` (minutes per scenario under TCG).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from captainos import e2e
from captainos.e2e import Lab, Plan, Result

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
PATTERN = b"CAPTAINOS-E2E-PATTERN-0123456789"  # examples/workflow.yaml writes it at 1 MiB
PATTERN_OFFSET = 2048 * 512


@contextmanager
def provision(cfg, image, reports: list[tuple[str, str]], workflow: Path,
              **plan: object) -> Iterator[tuple[Lab, Result]]:
    kernel, initrd = image
    with Lab(cfg, Plan(workflow=workflow, kernel=kernel, initrd=initrd, **plan)) as lab:  # type: ignore[arg-type]
        result = lab.run()
        print(result.report())
        (lab.workdir / "report.txt").write_text(result.report() + "\n")
        reports.append((f"{workflow.name} {plan}" if plan else workflow.name, result.report()))
        yield lab, result


def explain(lab: Lab, result: Result) -> str:
    return f"{result.report()}\n{lab.diagnostics()}"


GUEST_PULL = [  # the registry's access log line, or its own "response completed" line
    re.compile(r'"GET /v2/tink-agent/manifests/[^"]*" 200 \d+ "[^"]*" "(?!skopeo)[^"]*"$', re.MULTILINE),
    re.compile(r'^(?!.*skopeo).*msg="response completed".*http\.request\.method=GET'
               r'.*http\.request\.uri="?/v2/tink-agent/manifests/.*http\.response\.status=200', re.MULTILINE),
]


def check_every_run(lab: Lab, result: Result) -> None:
    """What every scenario shows besides its own outcome: the guest (not the harness's skopeo)
    pulled the agent from the harness registry; the VM's logs reached syslog under one host
    name, the one on its console; the agent logged each action the server handed out."""
    registry = lab.auth_registry or lab.open_registry
    assert registry is not None
    reg_log = registry.log_file.read_text()
    assert any(p.search(reg_log) for p in GUEST_PULL), "no guest pull of tink-agent\n" + lab.diagnostics()
    from_vm = [m for m in result.syslog if m.peer.startswith("127.0.0.1:")]
    names = {m.hostname for m in from_vm}
    assert from_vm and len(names) == 1 and not names & {"", "-"}, f"syslog hostnames {names}\n" + explain(lab, result)
    hostname = e2e.guest_hostname(result.serial)
    assert hostname is None or names == {hostname}, f"syslog hostnames {names}, console says {hostname}"
    received = [obj for _, obj in result.agent_lines() if obj["msg"] == "received action"]
    assert len(received) == len(result.served()), explain(lab, result)


# --- scenario 1 (and 6): three actions on the virtio disk --------------------------------------

@pytest.fixture(scope="module")
def disk_run(e2e_cfg, e2e_image, e2e_reports):
    with provision(e2e_cfg, e2e_image, e2e_reports, REPO / "examples" / "workflow.yaml") as run:
        yield run


def test_three_actions_succeed_in_order_and_write_the_disk(disk_run):
    lab, result = disk_run
    assert result.state == "SUCCESS", explain(lab, result)
    assert result.reports() == [
        ("write-pattern", "RUNNING"), ("write-pattern", "SUCCESS"),
        ("check-pattern", "RUNNING"), ("check-pattern", "SUCCESS"),
        ("host-network", "RUNNING"), ("host-network", "SUCCESS"),
    ], explain(lab, result)
    assert result.served() == ["write-pattern", "check-pattern", "host-network"]
    check_every_run(lab, result)
    # The VM is off now: the pattern is in the disk image, where the first action put it.
    with result.disk.open("rb") as disk:
        disk.seek(PATTERN_OFFSET)
        assert disk.read(len(PATTERN)) == PATTERN
    agent_messages = [obj["msg"] for _, obj in result.agent_lines()]
    assert agent_messages.count("received action") == 3, explain(lab, result)
    assert agent_messages.count("reported action status") == 6, explain(lab, result)
    marks = dict(result.timeline)
    assert marks["first action received"] is not None and marks["workflow done"] is not None
    assert marks["first action received"] <= marks["workflow done"]


def test_agent_and_action_logs_reach_syslog_with_the_vm_hostname(disk_run):
    lab, result = disk_run
    hostname = e2e.guest_hostname(result.serial)
    from_vm = [m for m in result.syslog if m.peer.startswith("127.0.0.1:")]
    assert from_vm, explain(lab, result)
    names = {m.hostname for m in from_vm}
    if hostname is not None:
        assert names == {hostname}, f"syslog hostnames {names}, console says {hostname}"
    else:
        assert len(names) == 1 and "" not in names, f"syslog hostnames {names}"
    agent = [m for m in from_vm if '"msg":"received action"' in m.msg]
    assert len(agent) == 3, explain(lab, result)
    action_output = [m for m in from_vm if "read back: " + PATTERN.decode() in m.msg]
    assert action_output, "the check-pattern action's stdout did not reach syslog\n" + explain(lab, result)


# --- scenario 2: a failing action stops the workflow -------------------------------------------

def test_failing_action_is_reported_failed_and_stops_the_workflow(e2e_cfg, e2e_image, e2e_reports):
    with provision(e2e_cfg, e2e_image, e2e_reports, WORKFLOWS / "fail.yaml", settle=15) as (lab, result):
        assert result.state == "FAILED", explain(lab, result)
        check_every_run(lab, result)
        assert result.reports() == [("fine", "RUNNING"), ("fine", "SUCCESS"),
                                    ("boom", "RUNNING"), ("boom", "FAILED")], explain(lab, result)
        assert "never" not in result.served()
        errors = [obj for _, obj in result.agent_lines() if obj["msg"] == "error executing action"]
        assert errors, explain(lab, result)


# --- scenario 3: an action past its timeout -----------------------------------------------------

def test_action_past_its_timeout_is_reported_timeout(e2e_cfg, e2e_image, e2e_reports):
    with provision(e2e_cfg, e2e_image, e2e_reports, WORKFLOWS / "timeout.yaml") as (lab, result):
        assert result.state == "TIMEOUT", explain(lab, result)
        check_every_run(lab, result)
        assert result.reports() == [("sleepy", "RUNNING"), ("sleepy", "TIMEOUT")], explain(lab, result)
        assert "never" not in result.served()
        final = [r for r in result.records if r["kind"] == "report"][-1]
        assert final["start"] and final["stop"], final


# --- scenario 4: the agent image behind registry credentials ------------------------------------

def test_agent_from_authenticated_registry_and_password_never_leaks(e2e_cfg, e2e_image, e2e_reports):
    with provision(e2e_cfg, e2e_image, e2e_reports, WORKFLOWS / "hello.yaml", agent_auth=True) as (lab, result):
        assert result.state == "SUCCESS", explain(lab, result)
        assert lab.auth_registry is not None
        check_every_run(lab, result)
        reg_log = lab.auth_registry.log_file.read_text()
        # The guest fetched the agent's manifest from the registry that answers 401 to anyone without
        # credentials (the harness pushed with skopeo; the guest's client is something else).
        # (containerd resolves the tag with HEAD, then GETs the manifest by digest.)
        pulls = [line for line in reg_log.splitlines()
                 if 'msg="response completed"' in line and "http.request.method=GET" in line
                 and re.search(r'http\.request\.uri="?/v2/tink-agent/manifests/', line)
                 and "http.response.status=200" in line and "skopeo" not in line]
        assert pulls, lab.diagnostics()
        records = json.dumps(result.records)
        leaks = e2e.secret_leaks(result, records, lab.password)
        assert leaks == [], "the registry password leaked:\n" + "\n".join(leaks)
        assert lab.password not in reg_log


# --- scenario 5: the registry comes up after the VM -----------------------------------------------

def test_agent_comes_up_when_the_registry_starts_late(e2e_cfg, e2e_image, e2e_reports):
    with provision(e2e_cfg, e2e_image, e2e_reports, WORKFLOWS / "hello.yaml", registry_delay=60.0) as (lab, result):
        assert result.state == "SUCCESS", explain(lab, result)
        check_every_run(lab, result)
        marks = dict(result.timeline)
        assert marks["agent started"] is None or marks["agent started"] >= 60, result.report()
        assert lab.open_registry is not None
        reg_log = lab.open_registry.log_file.read_text()
        assert GUEST_PULL[0].search(reg_log), lab.diagnostics()
