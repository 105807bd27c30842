"""syslog-forward: a unit's journal to the remote syslog host as RFC 5424 over UDP."""

from __future__ import annotations

import pytest


def fake_tools(sandbox):
    sandbox.fake("journalctl", 'echo "line one"; echo "line two"')
    sandbox.fake("logger", f'cat >"{sandbox.tmp}/sent"')


def call(sandbox, name):
    """The recorded call of one side of the pipeline (both sides start concurrently)."""
    return next(line for line in sandbox.call_lines() if line.startswith(name + " "))


def test_forwards_the_unit_log_with_rfc5424_over_udp(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=10.0.2.2 facility=kern\n")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    journal, logger = call(sandbox, "journalctl"), call(sandbox, "logger")
    assert journal == "journalctl --boot --follow --lines=all --output=cat --unit=tink-agent.service"
    assert logger == "logger --rfc5424=notq --udp --server 10.0.2.2 --port 514 --tag tink-agent --priority user.info"
    assert (sandbox.tmp / "sent").read_text() == "line one\nline two\n"


def test_custom_port(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=logs.example syslog_port=5514")
    assert sandbox.run("syslog-forward", "tink-agent-setup").returncode == 0
    assert "--server logs.example --port 5514 --tag tink-agent-setup" in call(sandbox, "logger")


def test_bad_port_falls_back_to_514_with_a_warning(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=logs.example syslog_port=99999")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0
    assert "--port 514 " in call(sandbox, "logger")
    assert result.messages("warning") == ["invalid syslog_port, using 514"]


@pytest.mark.parametrize("cmdline", ["syslog_host=", "syslog_host=bad_host!", 'syslog_host="a b"'])
def test_bad_host_forwards_nothing(sandbox, cmdline):
    fake_tools(sandbox)
    sandbox.cmdline(cmdline)
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 2
    assert len(result.messages("error")) == 1
    assert sandbox.call_lines() == []
