"""The real tink-agent (built from the Go module proxy) talks to our workflow server, on this host.

No VM and no containerd: the agent's containerd socket is a plain file, so every image pull
fails at once. That is enough to prove the wire format both ways (GetAction fields, RUNNING
and final reports, agent id echo, attributes with the NICs) and the agent's TIMEOUT/FAILED
paths against our server's rules.

Kept beside the real-Tinkerbell lab (tests/lab/) because it needs no VM, namespace or API
server: a fault our model server injects in seconds (an agent with no containerd), which the
real server could only produce with a broken VM.
"""

import subprocess
import textwrap
import time

import pytest

from captainos.core import config
from captainos.core.run import Runner, base_env
from captainos.lab import agent, workflow

pytestmark = pytest.mark.integration
AGENT_ID = "de:ad:be:ef:00:01"


@pytest.fixture(scope="module")
def binary():
    return agent.build(config.load(), Runner()) / agent.BINARY


def run_agent(binary, tmp_path, text, wait_for, timeout=90):
    wf = workflow.parse(textwrap.dedent(text), "wire.yaml", {"worker_id": AGENT_ID})
    not_a_socket = tmp_path / "containerd.sock"
    not_a_socket.write_text("")
    log_path = tmp_path / "agent.log"
    with workflow.Server((wf,), config.load().cache_dir, long_poll=2, bind="127.0.0.1") as srv, \
            log_path.open("wb") as sink:
        proc = subprocess.Popen([str(binary), "--id", AGENT_ID, "--runtime", "containerd", "--grpc-server",
                                 f"127.0.0.1:{srv.port}", "--containerd-socket", str(not_a_socket),
                                 "--attribute-detection=true"], stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=base_env())
        try:
            state = srv.wait_done(wf.id, timeout)
            if wait_for:
                srv.wait_record(wait_for, 10)
            time.sleep(1)
        finally:
            proc.terminate()
            proc.wait(10)
        return state, srv.snapshot(), log_path.read_text()


def test_action_past_its_timeout_is_reported_timeout(binary, tmp_path):
    state, records, agent_log = run_agent(binary, tmp_path, """
        name: wire
        worker: "{{ worker_id }}"
        tasks:
          - name: t
            environment: {FROM_TASK: "1"}
            actions:
              - {name: slow-pull, image: "127.0.0.1:1/none:tag", timeout: 3, command: [/bin/true]}
              - {name: never, image: "127.0.0.1:1/none:tag", timeout: 3}
    """, None)
    assert state == "TIMEOUT", agent_log
    reports = [(r["action"], r["state"]) for r in records if r["kind"] == "report"]
    assert reports == [("slow-pull", "RUNNING"), ("slow-pull", "TIMEOUT")], agent_log
    assert [r["action"] for r in records if r["kind"] == "served"] == ["slow-pull"]
    served = records[0]
    assert served["agent_id"] == AGENT_ID and served["macs"], "the agent sends its NICs as attributes"
    final = records[-1]
    assert final["agent_id"] == AGENT_ID and final["message"] == "action completed"
    assert final["start"] and final["stop"] and final["duration"]
    # The agent's own log says the same thing.
    assert '"msg":"received action"' in agent_log and '"msg":"reported action status"' in agent_log
    assert '"args":["/bin/true"]' in agent_log and '"timeoutSeconds":3' in agent_log


def test_empty_workflow_agent_is_told_not_found(binary, tmp_path):
    """An agent id without a workflow gets NOT_FOUND: the agent logs it and keeps polling."""
    state, records, agent_log = run_agent(binary, tmp_path, """
        name: other
        worker: someone-else
        tasks:
          - name: t
            actions: [{name: a, image: i, timeout: 3}]
    """, None, timeout=6)
    assert state == "PENDING" and records == []
    assert agent_log.count("No workflow found") >= 2, agent_log  # NOT_FOUND, logged, polled again
