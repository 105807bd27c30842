"""syslog-forward: a unit's journal streamed to the remote syslog host as RFC 5424 over UDP,
each entry once (the position saved at a stop), with the DHCP host name applied first."""

from __future__ import annotations

import time

import pytest

from tests.image.conftest import PROGRAMS


def fake_tools(sandbox, *, logger_fails: bool = False, stop_after: float | None = 0.3):
    """journalctl prints the entries of `journal` (one "cursor<TAB>message" a line) after the
    position in its --cursor-file, then follows: new lines of `journal` are printed as they
    come; on SIGTERM it writes the cursor of the last entry printed to the --cursor-file and
    exits, as journalctl does. With STOP_AFTER, STOP_AFTER seconds after its first output it
    sends the forwarder SIGTERM (systemd's stop request). logger appends each line it is
    sent, with the host name of the moment, to `sent`."""
    (sandbox.tmp / "journal").touch(exist_ok=True)
    stop = "" if stop_after is None else f'(sleep {stop_after}; kill -TERM "$PPID") &'
    # SIGTERM is taken between entries, never between printing one and noting its cursor (bash
    # runs a trap between any two commands; journalctl's own handler runs in its event loop).
    sandbox.fake("journalctl", f"""
last="" stop=0
trap 'stop=1' TERM
finish() {{ [[ -z $last ]] || printf "%s\\n" "$last" >"$file"; exit 143; }}
file=""
for arg; do [[ $arg == --cursor-file=* ]] && file=${{arg#*=}}; done
after=""
[[ -z $file || ! -s $file ]] || after=$(<"$file")
if [[ -n $after ]] && ! grep -q "^$after	" "{sandbox.tmp}/journal"; then
    echo "Failed to seek to cursor: Invalid argument" >&2; exit 1
fi
last=$after
{stop}
while :; do
    seen=0
    while IFS=$'\\t' read -r cursor message; do
        if [[ -z $after || $seen == 1 ]]; then printf '%s\\n' "$message"; last=$cursor; fi
        [[ $cursor != "$after" ]] || seen=1
        ((stop == 0)) || finish
    done <"{sandbox.tmp}/journal"
    after=$last
    ((stop == 0)) || finish
    sleep 0.05 & wait $!
    ((stop == 0)) || finish
done
""")
    fail = "exit 1" if logger_fails else ""
    hostname = sandbox.root / "proc/sys/kernel/hostname"
    sandbox.fake("logger", f'{fail}\nwhile IFS= read -r line; do\n'
                           f'  printf "%s %s\\n" "$(cat {hostname})" "$line" >>"{sandbox.tmp}/sent"\n'
                           f'done')
    # getent: fails while the `unresolved` file counts down (one try each), else resolves.
    sandbox.fake("getent", f'f="{sandbox.tmp}/unresolved"\n'
                           f'if [[ -s $f ]] && (( $(<"$f") > 0 )); then echo $(( $(<"$f") - 1 )) >"$f"; exit 2; fi')
    (sandbox.root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (sandbox.root / "proc/sys/kernel/hostname").write_text("localhost\n")
    sandbox.env.update({"DHCP_HOSTNAME": str(PROGRAMS / "dhcp-hostname")})


def journal(sandbox, *messages: str) -> None:
    path = sandbox.tmp / "journal"
    count = len(path.read_text().splitlines())
    with path.open("a") as handle:
        for i, message in enumerate(messages, start=count + 1):
            handle.write(f"s=abc;i={i}\t{message}\n")


def sent(sandbox) -> list[str]:
    path = sandbox.tmp / "sent"
    return path.read_text().splitlines() if path.exists() else []


def sent_messages(sandbox) -> list[str]:
    return [line.split(" ", 1)[1] for line in sent(sandbox)]


def call(sandbox, name):
    return next(line for line in sandbox.call_lines() if line.startswith(name + " "))


CURSOR = "run/captainos/syslog/tink-agent.cursor"


def test_streams_the_unit_log_with_rfc5424_over_udp(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "line one", "line two")
    sandbox.cmdline("syslog_host=10.0.2.2 facility=kern\n")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    cursor_file = sandbox.root / "run/captainos/syslog/tink-agent.cursor.next"
    assert call(sandbox, "journalctl") == ("journalctl --boot --quiet --follow --lines=all --output=cat "
                                           f"--unit=tink-agent.service --cursor-file={cursor_file}")
    assert call(sandbox, "logger") == ("logger --rfc5424=notq --udp --server 10.0.2.2 --port 514 --tag tink-agent "
                                       "--priority user.info")
    assert sent(sandbox) == ["localhost line one", "localhost line two"]
    assert (sandbox.root / CURSOR).read_text() == "s=abc;i=2\n"


def test_one_journalctl_and_one_logger_for_any_number_of_entries(sandbox):
    """Entries written while the forwarder runs go through the same two programs: nothing
    runs per entry or per burst (rounds of programs cost the emulated boot seconds)."""
    fake_tools(sandbox, stop_after=2.0)
    journal(sandbox, "early")
    sandbox.cmdline("syslog_host=10.0.2.2")
    writer = f'(sleep 0.5; printf "s=abc;i=2\\tlater\\n" >>"{sandbox.tmp}/journal"; sleep 0.5; ' \
             f'printf "s=abc;i=3\\tlast\\n" >>"{sandbox.tmp}/journal") &'
    journalctl = sandbox.bin / "journalctl"
    journalctl.write_text(journalctl.read_text().replace("\nwhile :; do", f"\n{writer}\nwhile :; do", 1))
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    assert sent_messages(sandbox) == ["early", "later", "last"]
    assert sorted(line.split(" ", 1)[0] for line in sandbox.call_lines()) == ["journalctl", "logger"]
    assert (sandbox.root / CURSOR).read_text() == "s=abc;i=3\n"


def test_a_restart_sends_only_what_is_new(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one", "two")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0  # nothing new: nothing sent
    journal(sandbox, "three")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sent_messages(sandbox) == ["one", "two", "three"]
    assert (sandbox.root / CURSOR).read_text() == "s=abc;i=3\n"


def test_a_failed_send_is_sent_again_not_skipped(sandbox):
    """logger fails: journalctl is stopped (its position is not kept), the forwarder fails
    (systemd restarts it) and the restart sends the lines again."""
    fake_tools(sandbox, logger_fails=True, stop_after=None)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one")
    started = time.monotonic()
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert result.messages("error") == ["logger failed; the unit's log is sent again from the last saved position"]
    assert not (sandbox.root / CURSOR).exists()
    fake_tools(sandbox)
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sent_messages(sandbox) == ["one"]


def test_a_stop_during_a_send_lets_logger_finish_then_saves_the_position(sandbox):
    """systemd's SIGTERM (KillMode=mixed: the forwarder alone) while logger is sending:
    journalctl stops, logger sends what it has, the position is saved, a restart repeats nothing."""
    fake_tools(sandbox, stop_after=None)
    logger = sandbox.bin / "logger"
    logger.write_text(logger.read_text().replace(
        "; do\n", '; do\n  [[ -n ${stopped-} ]] || { stopped=1; kill -TERM "$PPID"; sleep 0.3; }\n', 1))
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one", "two")
    result = sandbox.run("syslog-forward", "tink-agent", timeout=10)
    assert result.returncode == 0, result.stderr
    assert sent_messages(sandbox)[0] == "one"
    assert (sandbox.root / CURSOR).exists()
    fake_tools(sandbox)
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert sent_messages(sandbox) == ["one", "two"]
    assert (sandbox.root / CURSOR).read_text() == "s=abc;i=2\n"


def test_a_stop_before_journalctl_started_still_ends_it(sandbox):
    """A stop request while the host name is applied (before journalctl runs) must not leave
    a journalctl following forever: the forwarder ends promptly."""
    fake_tools(sandbox, stop_after=None)
    hostname = sandbox.fake("dhcp-hostname", 'kill -TERM "$PPID"; sleep 0.2')
    sandbox.env["DHCP_HOSTNAME"] = str(hostname)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one")
    started = time.monotonic()
    result = sandbox.run("syslog-forward", "tink-agent", timeout=20)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10


def test_an_unknown_cursor_starts_over_instead_of_stalling(sandbox):
    fake_tools(sandbox)
    sandbox.cmdline("syslog_host=10.0.2.2")
    journal(sandbox, "one")
    cursor = sandbox.root / CURSOR
    cursor.parent.mkdir(parents=True)
    cursor.write_text("s=gone;i=99\n")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    assert result.messages("warning") == [
        "the saved journal position is unusable; forwarding from the start of the boot"]
    assert result.logs()[-1]["error"] == "Failed to seek to cursor: Invalid argument"
    assert sent_messages(sandbox) == ["one"]
    assert cursor.read_text() == "s=abc;i=1\n"


def test_journalctl_ending_by_itself_fails_the_forwarder(sandbox):
    """No saved position and journalctl ends anyway: an error and a failure (systemd restarts
    the forwarder), never a loop that spins."""
    fake_tools(sandbox, stop_after=None)
    sandbox.fake("journalctl", 'echo "No journal files were found." >&2; exit 1')
    sandbox.cmdline("syslog_host=10.0.2.2")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 1
    assert result.messages("error") == ["journalctl ended"]
    assert result.logs()[-1]["error"] == "No journal files were found."


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


@pytest.mark.parametrize("port", ["99999", "0", "x"])
def test_a_refused_port_falls_back_to_514_with_one_error(sandbox, port):
    fake_tools(sandbox)
    journal(sandbox, "x")
    sandbox.cmdline(f"syslog_host=logs.example syslog_port={port}")
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0
    assert "--port 514 " in call(sandbox, "logger")
    # (a fake here runs dhcp-hostname, which parses the command line too: at boot, the generator parses once)
    assert set(result.messages("error")) == {"refusing a parameter: not a port (1-65535)"}


def test_a_port_with_leading_zeros_is_read_in_base_10(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
    sandbox.cmdline("syslog_host=logs.example syslog_port=0514")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert "--port 514 " in call(sandbox, "logger")


def test_an_ipv6_host_is_forwarded_to(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
    sandbox.cmdline("syslog_host=fd77::1")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert "--server fd77::1 --port 514 " in call(sandbox, "logger")


@pytest.mark.parametrize("cmdline", ["syslog_host=", "syslog_host=bad_host!", 'syslog_host="a b"',
                                     "syslog_host=fd77:::1"])
def test_bad_host_forwards_nothing(sandbox, cmdline):
    fake_tools(sandbox)
    sandbox.cmdline(cmdline)
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 2
    assert result.messages("error") == ["refusing a parameter: not a host name or IP address",
                                        "syslog_host is not a host name or IP address; nothing forwarded"]
    assert sandbox.call_lines() == []


def test_a_name_that_does_not_resolve_is_one_error_then_looked_up_again(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
    (sandbox.tmp / "unresolved").write_text("3\n")
    sandbox.cmdline("syslog_host=syslog.lab")
    sandbox.env.update({"RESOLVE_RETRY": "0.05"})
    result = sandbox.run("syslog-forward", "tink-agent")
    assert result.returncode == 0, result.stderr
    assert result.messages("error") == ["syslog_host does not resolve; looking it up again every 0.05s"]
    assert [line for line in sandbox.call_lines() if line.startswith("getent")] == ["getent ahosts syslog.lab"] * 4
    assert "syslog_host resolves now" in result.messages("info")
    assert "--server syslog.lab --port 514 " in call(sandbox, "logger")
    assert sent_messages(sandbox) == ["x"]


def test_an_address_is_never_looked_up(sandbox):
    fake_tools(sandbox)
    journal(sandbox, "x")
    sandbox.cmdline("syslog_host=10.0.2.2")
    assert sandbox.run("syslog-forward", "tink-agent").returncode == 0
    assert not any(line.startswith("getent") for line in sandbox.call_lines())
