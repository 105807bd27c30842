"""syslog-forward: a unit's journal to the remote syslog host as RFC 5424 over UDP, each
entry once (a saved cursor), with the DHCP host name applied first."""

from __future__ import annotations

import time

import pytest

from tests.image.conftest import PROGRAMS


def fake_tools(sandbox, *, logger_fails: bool = False):
    """journalctl serves the entries of `journal` (one "cursor<TAB>message" a line) after the
    --after-cursor it is given, ending with "-- cursor: <last>" like --show-cursor; logger
    appends what it is sent, with the host name of the moment, to `sent`."""
    (sandbox.tmp / "journal").touch(exist_ok=True)
    sandbox.fake("journalctl", f"""
after=""
while (($#)); do [[ $1 == --after-cursor ]] && after=$2; shift; done
[[ -z $after ]] || grep -q "^$after	" "{sandbox.tmp}/journal" || {{ echo "Failed to seek to cursor" >&2; exit 1; }}
awk -F'\\t' -v after="$after" 'after == "" || seen {{ print $2; last = $1 }} $1 == after {{ seen = 1 }}
    END {{ if (last != "") print "-- cursor: " last }}' "{sandbox.tmp}/journal"
""")
    fail = "exit 1" if logger_fails else ""
    sandbox.fake("logger", f'{fail}\nsed "s/^/$(cat {sandbox.root}/proc/sys/kernel/hostname) /" >>"{sandbox.tmp}/sent"')
    (sandbox.root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (sandbox.root / "proc/sys/kernel/hostname").write_text("localhost\n")
    sandbox.env.update({"ROUNDS": "1", "DHCP_HOSTNAME": str(PROGRAMS / "dhcp-hostname")})


def journal(sandbox, *messages: str) -> None:
    path = sandbox.tmp / "journal"
    count = len(path.read_text().splitlines())
    with path.open("a") as handle:
        for i, message in enumerate(messages, start=count + 1):
            handle.write(f"s=abc;i={i}\t{message}\n")


def sent(sandbox) -> list[str]:
    path = sandbox.tmp / "sent"
    return path.read_text().splitlines() if path.exists() else []


def call(sandbox, name):
    return next(line for line in sandbox.call_lines() if line.startswith(name + " "))


def test_forwards_the_unit_log_with_rfc5424_over_udp(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "line one", "line two")
    sandbox.cmdline("syslog_host=10.0.2.2 facility=kern\n")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    assert call(sandbox, "journalctl") == ("journalctl --boot --quiet --output=cat --show-cursor "
                                           "--unit=tink-agent.service")
    assert call(sandbox, "logger") == ("logger --rfc5424=notq --udp --server 10.0.2.2 --port 514 --tag tink-agent "
                                       "--priority user.info")
    assert sent(sandbox) == ["localhost line one", "localhost line two"]


def test_a_restart_sends_only_what_is_new(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one", "two")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0  # nothing new: nothing sent
    journal(sandbox, "three")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["one", "two", "three"]
    cursor = sandbox.root / "run/captainos/syslog/tink-agent.cursor"
    assert cursor.read_text() == "s=abc;i=3\n"


def test_a_failed_send_is_sent_again_not_skipped(sandbox):
    fake_tools(sandbox, logger_fails=True)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one")
    assert sandbox.run("syslog-forward", "tink-agent").returncode != 0
    assert not (sandbox.root / "run/captainos/syslog/tink-agent.cursor").exists()
    fake_tools(sandbox)
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["one"]


def test_a_stop_during_a_send_saves_the_cursor_first(sandbox):
    """systemd's SIGTERM (KillMode=mixed: the forwarder alone) while logger is sending: the
    round completes, the cursor is saved, and a restart sends nothing again."""
    fake_tools(sandbox)
    logger = sandbox.bin / "logger"
    logger.write_text(logger.read_text().replace("\nsed ", '\nkill -TERM "$PPID"; sleep 0.3\nsed ', 1))
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one", "two")
    sandbox.env["ROUNDS"] = "0"  # forever, unless the stop request ends it
    result = sandbox.run("syslog-forward", "tink-agent", timeout=10)
    assert result.returncode == 0, result.stderr
    assert (sandbox.root / "run/captainos/syslog/tink-agent.cursor").read_text() == "s=abc;i=2\n"
    fake_tools(sandbox)
    sandbox.env["ROUNDS"] = "1"
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["one", "two"]


def test_an_unknown_cursor_starts_over_instead_of_stalling(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one")
    cursor = sandbox.root / "run/captainos/syslog/tink-agent.cursor"
    cursor.parent.mkdir(parents=True)
    cursor.write_text("s=gone;i=99\n")
    sandbox.env["ROUNDS"] = "2"
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    assert result.messages("warning") == [
        "the saved journal position is unusable; forwarding from the start of the boot"]
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["one"]


def test_the_dhcp_host_name_is_applied_before_the_first_line(sandbox):
    fake_tools(sandbox)
    leases = sandbox.root / "run/systemd/netif/leases"
    leases.mkdir(parents=True)
    (leases / "2").write_text("ADDRESS=10.0.2.15\nHOSTNAME=from-dhcp\n")
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "first")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sent(sandbox) == ["from-dhcp first"]


def test_custom_port(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
    sandbox.cmdline("syslog_host=logs.example syslog_port=5514")
    assert sandbox.run("syslog-forward", "tink-agent-setup").returncode == 0
    assert "--server logs.example --port 5514 --tag tink-agent-setup" in call(sandbox, "logger")


def test_bad_port_falls_back_to_514_with_a_warning(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
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


def follower(sandbox, body: str, entry: str, **env: str) -> None:
    """The fake tools with ENTRY in the journal and syslog_host set; journalctl --follow runs
    BODY (the wake-up signal), every other call serves the journal; ENV for the forwarder."""
    fake_tools(sandbox)
    journal(sandbox, entry)
    fake = sandbox.bin / "journalctl"
    branch = f'\nif [[ " $* " == *" --follow "* ]]; then\n{body}\nfi\nafter='
    fake.write_text(fake.read_text().replace("\nafter=", branch, 1))
    sandbox.cmdline("syslog_host=10.0.2.2")
    sandbox.env.update(env)


def rounds(sandbox) -> int:
    """How many rounds ran: the journalctl calls that read by cursor (not the follower)."""
    return len([line for line in sandbox.call_lines() if line.startswith("journalctl ") and "--follow" not in line])


def test_an_entry_wakes_the_forwarder_at_once(sandbox):
    """After the first round a `journalctl --follow` of the unit is the wake-up: an entry
    written a second later is sent in the next round, long before the WAKE safety net."""
    follower(sandbox, f'(sleep 1; printf "s=abc;i=2\\tlate\\n" >>"{sandbox.tmp}/journal") &\n'
                      f'exec tail -n 0 -F "{sandbox.tmp}/journal"', "early", ROUNDS="2", POLL="0.2", WAKE="60")
    result = sandbox.run("syslog-forward", "tink-agent", timeout=20)
    assert result.returncode == 0, result.stderr
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["early", "late"]
    calls = [line for line in sandbox.call_lines() if line.startswith("journalctl ")]
    assert calls[1] == "journalctl --boot --quiet --follow --lines=0 --output=cat --unit=tink-agent.service"
    assert len(calls) == 3  # two rounds and the follower


def test_with_nothing_written_no_round_runs_until_wake(sandbox):
    """Idle, the forwarder runs no journalctl at all (polling ran one a second per unit,
    which under emulation took CPU from the boot); WAKE seconds later one round runs anyway."""
    follower(sandbox, "exec sleep 30", "only", ROUNDS="2", POLL="0.1", WAKE="2")
    started = time.monotonic()
    result = sandbox.run("syslog-forward", "tink-agent", timeout=20)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 1.9
    assert rounds(sandbox) == 2
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["only"]


def test_a_stop_while_idle_ends_at_once_with_a_last_round(sandbox):
    """SIGTERM while the forwarder waits for an entry: bash does not interrupt a read for a
    trapped signal, so the trap stops the follower; the last round runs, the cursor is saved."""
    follower(sandbox, '(sleep 1; kill -TERM "$PPID") &\nexec sleep 60', "one", ROUNDS="0", POLL="0.1", WAKE="60")
    started = time.monotonic()
    result = sandbox.run("syslog-forward", "tink-agent", timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert (sandbox.root / "run/captainos/syslog/tink-agent.cursor").read_text() == "s=abc;i=1\n"
    assert [line.split(" ", 1)[1] for line in sent(sandbox)] == ["one"]


def test_a_follower_that_ends_at_once_leaves_polling(sandbox):
    follower(sandbox, "exit 0", "one", ROUNDS="3", POLL="0.1", WAKE="60")
    result = sandbox.run("syslog-forward", "tink-agent", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "journalctl --follow ended; polling every 0.1s" in result.messages("info")
    assert rounds(sandbox) == 3


def test_a_unit_that_never_stops_writing_still_gets_rounds(sandbox):
    """A follower printing every 10 ms: each wake-up gathers for POLL seconds, then a round."""
    follower(sandbox, "while :; do echo x; sleep 0.01; done", "one", ROUNDS="4", POLL="0.2", WAKE="60")
    started = time.monotonic()
    result = sandbox.run("syslog-forward", "tink-agent", timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert rounds(sandbox) == 4
