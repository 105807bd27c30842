"""The workflow file format and the workflow server's rules, over real gRPC on 127.0.0.1."""

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from captainos.core.errors import CaptainError
from captainos.lab import workflow

REPO = Path(__file__).resolve().parents[2]
AGENT = "52:54:00:12:34:56"

THREE = """
name: three
worker: "{{ worker_id }}"
tasks:
  - name: disk
    environment: {DEST: /dev/vda, SHARED: task}
    volumes: ["/dev:/dev"]
    actions:
      - name: write
        image: "{{ registry }}/busybox:e2e"
        timeout: 60
        command: ["/bin/sh", "-c", "echo hi"]
        environment: {SHARED: action, FLAG: true}
      - name: check
        image: busybox
        timeout: 30
        pid: host
      - name: net
        image: busybox
        timeout: 30
        namespaces: {network: host, pid: host}
"""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return workflow.stubs(tmp_path_factory.mktemp("cache"))


def three(**kw):
    return workflow.parse(THREE, "three.yaml", {"worker_id": AGENT, "registry": "10.0.2.2:5000", **kw})


@pytest.fixture
def serve(stubs, tmp_path):
    """Start a server for the given workflows; yield (server, client stub, pb2)."""
    started = []

    def start(*wfs, long_poll=0.3):
        srv = workflow.Server(tuple(wfs), tmp_path, long_poll=long_poll, bind="127.0.0.1").start()
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        started.append((srv, channel))
        return srv, stubs[1].WorkflowServiceStub(channel), stubs[0]

    yield start
    for srv, channel in started:
        channel.close()
        srv.stop()


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def report(stub, pb2, resp, state):
    stub.ReportActionStatus(pb2.ActionStatusRequest(
        workflow_id=resp.workflow_id, agent_id=resp.agent_id, task_id=resp.task_id, action_id=resp.action_id,
        action_name=resp.name, action_state=pb2.ActionStatusRequest.StateType.Value(state),
        message=pb2.ActionMessage(message=f"{resp.name} {state}")))


# --- the file ---------------------------------------------------------------------------------

def test_parse_renders_placeholders_and_keeps_structure():
    wf = three()
    assert wf.id == "default/three"
    task = wf.tasks[0]
    assert task.worker == AGENT and task.volumes == ("/dev:/dev",)
    write, check, net = task.actions
    assert write.image == "10.0.2.2:5000/busybox:e2e"
    assert write.command == ("/bin/sh", "-c", "echo hi")
    assert dict(write.environment) == {"SHARED": "action", "FLAG": "true"}
    assert check.pid == "host" and net.network_ns == "host" and net.pid_ns == "host"


def test_tinkerbell_style_placeholder_is_accepted():
    wf = workflow.parse(THREE.replace("{{ worker_id }}", "{{.device_1}}"), "t.yaml",
                        {"device_1": AGENT, "registry": "r"})
    assert wf.tasks[0].worker == AGENT


def test_example_workflow_parses():
    wf = workflow.load(REPO / "examples" / "workflow.yaml",
                       {"worker_id": AGENT, "action_image": "10.0.2.2:1/actions/busybox:e2e"})
    assert [a.name for a in wf.tasks[0].actions] == ["write-pattern", "check-pattern", "host-network"]


@pytest.mark.parametrize(("text", "message"), [
    ("tasks: [\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: x\nworker: w\n", "'tasks' must be a non-empty list"),
    ("name: x\ntasks:\n  - name: t\n    actions: [{name: a, image: i, timeout: 5}]\n", "no 'worker'"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, image: i}]\n", "positive whole 'timeout'"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, image: i, timeout: -1}]\n", "timeout"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, timeout: 5}]\n", "missing 'image'"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, image: i, timeout: 5, comand: [x]}]\n",
     "unknown key 'comand'"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, image: i, timeout: 5, command: ls}]\n",
     "must be a list"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions: [{name: a, image: i, timeout: 5, volumes: [/dev]}]\n",
     "bad volume"),
    ("name: x\nworker: w\ntasks:\n  - name: t\n    actions:\n      - {name: a, image: i, timeout: 5}\n"
     "      - {name: a, image: i, timeout: 5}\n", "duplicate action names"),
    ("name: x\nworker: {{ worker_id }}\ntasks: []\n", "quote values"),
    ("name: x\nworker: '{{ nope }}'\ntasks: []\n", "unknown placeholder"),
])
def test_bad_files_give_one_clear_error(text, message):
    with pytest.raises(CaptainError) as info:
        workflow.parse(text, "bad.yaml", {"worker_id": AGENT})
    assert message in str(info.value)
    assert str(info.value).startswith("bad.yaml")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CaptainError, match="cannot read workflow"):
        workflow.load(tmp_path / "nope.yaml")


# --- the server ---------------------------------------------------------------------------------

def test_empty_agent_id_is_invalid_argument_at_once(serve):
    _, stub, pb2 = serve(three(), long_poll=5)
    start = time.monotonic()
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id=""))) == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - start < 2


def test_unknown_agent_is_not_found_after_the_long_poll(serve):
    _, stub, pb2 = serve(three(), long_poll=0.5)
    start = time.monotonic()
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id="someone-else"))) == grpc.StatusCode.NOT_FOUND
    assert time.monotonic() - start >= 0.5


def test_actions_are_served_in_order_with_merged_environment(serve):
    srv, stub, pb2 = serve(three())
    first = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    assert (first.name, first.agent_id, first.timeout) == ("write", AGENT, 60)
    assert list(first.environment) == ["DEST=/dev/vda", "FLAG=true", "SHARED=action"]
    assert list(first.volumes) == ["/dev:/dev"] and list(first.command) == ["/bin/sh", "-c", "echo hi"]
    # Not finished yet: the same action again (what the real server does after a restart).
    assert stub.GetAction(pb2.ActionRequest(agent_id=AGENT)).action_id == first.action_id
    report(stub, pb2, first, "RUNNING")
    assert stub.GetAction(pb2.ActionRequest(agent_id=AGENT)).action_id == first.action_id
    report(stub, pb2, first, "SUCCESS")
    second = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    assert second.name == "check" and second.pid == "host" and not second.HasField("namespaces")
    report(stub, pb2, second, "RUNNING")
    report(stub, pb2, second, "SUCCESS")
    third = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    assert third.namespaces.network == "host" and third.pid == "host"
    report(stub, pb2, third, "RUNNING")
    report(stub, pb2, third, "SUCCESS")
    assert srv.state("default/three") == "SUCCESS"
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id=AGENT))) == grpc.StatusCode.FAILED_PRECONDITION
    assert [(r["action"], r["state"]) for r in srv.snapshot() if r["kind"] == "report"] == [
        ("write", "RUNNING"), ("write", "SUCCESS"), ("check", "RUNNING"), ("check", "SUCCESS"),
        ("net", "RUNNING"), ("net", "SUCCESS")]


@pytest.mark.parametrize("final", ["FAILED", "TIMEOUT"])
def test_failed_or_timed_out_action_stops_the_workflow(serve, final):
    srv, stub, pb2 = serve(three())
    first = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    report(stub, pb2, first, "RUNNING")
    report(stub, pb2, first, final)
    assert srv.state("default/three") == final
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id=AGENT))) == grpc.StatusCode.FAILED_PRECONDITION
    assert [r["action"] for r in srv.snapshot() if r["kind"] == "served"] == ["write"]


def test_long_poll_answers_as_soon_as_a_workflow_appears(serve):
    srv, stub, pb2 = serve(long_poll=10)
    got = {}

    def ask():
        got["resp"] = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))

    thread = threading.Thread(target=ask)
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)
    assert "resp" not in got  # still polling
    srv.add(three())
    thread.join(5)
    assert got["resp"].name == "write"
    assert time.monotonic() - start < 3  # woken by the change, not by the 10 s deadline


def test_nothing_to_do_waits_for_the_long_poll_then_fails_precondition(serve):
    _, stub, pb2 = serve(three(), long_poll=0.6)
    first = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    report(stub, pb2, first, "FAILED")
    start = time.monotonic()
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id=AGENT))) == grpc.StatusCode.FAILED_PRECONDITION
    assert 0.6 <= time.monotonic() - start < 3


def test_report_validation(serve):
    _, stub, pb2 = serve(three())
    first = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    for missing in ("workflow_id", "task_id", "action_id"):
        fields = {"workflow_id": first.workflow_id, "agent_id": AGENT, "task_id": first.task_id,
                  "action_id": first.action_id, missing: ""}
        code = code_of(lambda f=fields: stub.ReportActionStatus(pb2.ActionStatusRequest(**f)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    code = code_of(lambda: stub.ReportActionStatus(pb2.ActionStatusRequest(
        workflow_id=first.workflow_id, agent_id=AGENT, task_id=first.task_id, action_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    code = code_of(lambda: stub.ReportActionStatus(pb2.ActionStatusRequest(
        workflow_id=first.workflow_id, agent_id="other", task_id=first.task_id, action_id=first.action_id)))
    assert code == grpc.StatusCode.NOT_FOUND


def test_task_of_another_worker_is_not_served(serve):
    text = THREE.replace("  - name: disk\n", "  - name: disk\n    worker: other-agent\n")
    wf = workflow.parse(text, "t.yaml", {"worker_id": AGENT, "registry": "r"})
    _, stub, pb2 = serve(wf)
    assert code_of(lambda: stub.GetAction(pb2.ActionRequest(agent_id=AGENT))) == grpc.StatusCode.NOT_FOUND
    assert stub.GetAction(pb2.ActionRequest(agent_id="other-agent")).name == "write"


def test_records_hold_no_environment_or_command_and_dump_as_json(serve, tmp_path):
    text = THREE.replace("SHARED: action", "SHARED: action, PASSWORD: hunter2-secret")
    wf = workflow.parse(text, "t.yaml", {"worker_id": AGENT, "registry": "r"})
    srv, stub, pb2 = serve(wf)
    resp = stub.GetAction(pb2.ActionRequest(agent_id=AGENT, agent_attributes=pb2.AgentAttributes(
        network=[pb2.Network(name="eth0", mac=AGENT)])))
    assert "PASSWORD=hunter2-secret" in list(resp.environment)
    report(stub, pb2, resp, "RUNNING")
    srv.dump(tmp_path / "records.json")
    text = (tmp_path / "records.json").read_text()
    assert "hunter2-secret" not in text and "echo hi" not in text
    records = json.loads(text)
    assert records[0]["kind"] == "served" and records[0]["macs"] == [AGENT]
    assert records[1]["state"] == "RUNNING" and records[1]["message"] == "write RUNNING"


def test_concurrent_reports_are_all_recorded(serve):
    srv, stub, pb2 = serve(three())
    first = stub.GetAction(pb2.ActionRequest(agent_id=AGENT))
    threads = [threading.Thread(target=report, args=(stub, pb2, first, "RUNNING")) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for r in srv.snapshot() if r["kind"] == "report") == 20
