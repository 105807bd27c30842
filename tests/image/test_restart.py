"""restart: a workflow's restart request is carried out only after the agent reported the action."""

from __future__ import annotations

import os

import pytest

RUNNING = '1000.000001 captain tink-agent[7]: {"msg":"reported action status","action":{"name":"x"},"state":"running"}'
SUCCESS = '1002.500000 captain tink-agent[7]: {"msg":"reported action status","action":{"name":"x"},"state":"success"}'
EARLIER = '990.000000 captain tink-agent[7]: {"msg":"reported action status","action":{"name":"w"},"state":"success"}'


def setup(sandbox, request: str, journal: list[str], mtime: float = 1001.0, files: dict[str, str] | None = None):
    restart = sandbox.root / "run" / "captainos" / "restart"
    restart.mkdir(parents=True)
    for name, text in (files or {}).items():
        (restart / name).write_text(text)
    (restart / "request").write_text(request + "\n")
    os.utime(restart / "request", (mtime, mtime))
    lines = "\n".join(journal)
    sandbox.fake("journalctl", f"cat <<'END'\n{lines}\nEND")
    sandbox.fake("systemctl")
    sandbox.fake("kexec")
    sandbox.fake("sleep")
    sandbox.env["RESTART_POLL"] = "1"
    sandbox.cmdline("console=ttyS1\n")
    return restart


def test_reboot_waits_for_the_agents_final_report(sandbox):
    restart = setup(sandbox, "reboot", [EARLIER, RUNNING, SUCCESS])
    sandbox.cmdline("captainos.restart_wait=5")
    result = sandbox.run("restart")
    assert result.returncode == 0, result.stderr
    calls = sandbox.call_lines()
    assert calls[-1] == "systemctl --no-block reboot"
    assert not any(c.startswith("sleep") for c in calls)  # the report was already there
    assert not (restart / "request").exists()
    assert "restarting" in result.messages("info")


def test_an_earlier_actions_report_does_not_count(sandbox):
    """Only the report after the action that wrote the request: an earlier success is not it."""
    setup(sandbox, "reboot", [EARLIER, RUNNING])
    sandbox.cmdline("captainos.restart_wait=3")
    result = sandbox.run("restart")
    assert result.returncode == 0, result.stderr
    calls = sandbox.call_lines()
    assert [c for c in calls if c.startswith("sleep")] == ["sleep 1"] * 3
    assert calls[-1] == "systemctl --no-block reboot"
    assert "the agent reported nothing since the request; restarting anyway" in result.messages("warning")


@pytest.mark.parametrize(("value", "polls"), [("08", 8), ("0010", 10), ("3", 3)])
def test_restart_wait_is_read_in_base_10(sandbox, value, polls):
    setup(sandbox, "reboot", [EARLIER, RUNNING])
    sandbox.cmdline(f"captainos.restart_wait={value}")
    result = sandbox.run("restart")
    assert result.returncode == 0, result.stderr
    calls = sandbox.call_lines()
    assert [c for c in calls if c.startswith("sleep")] == ["sleep 1"] * polls
    assert calls[-1] == "systemctl --no-block reboot"


def test_kexec_loads_the_written_kernel_first(sandbox):
    setup(sandbox, "kexec", [RUNNING, SUCCESS], files={"kernel": "K", "initrd": "I", "cmdline": "console=ttyS1 x=1\n"})
    result = sandbox.run("restart")
    assert result.returncode == 0, result.stderr
    calls = sandbox.call_lines()
    restart = sandbox.root / "run" / "captainos" / "restart"
    kexec = next(c for c in calls if c.startswith("kexec"))
    assert kexec == f"kexec --load {restart}/kernel --append=console=ttyS1 x=1  --initrd={restart}/initrd"
    assert calls[-1] == "systemctl --no-block kexec"
    assert calls.index(kexec) < calls.index("systemctl --no-block kexec")


def kexec_loaded(sandbox, value: str) -> None:
    path = sandbox.root / "sys" / "kernel" / "kexec_loaded"
    path.parent.mkdir(parents=True)
    path.write_text(value + "\n")


def test_kexec_boots_the_kernel_an_action_loaded(sandbox):
    """What reboot-guard requests for the hub's kexec action: the kernel is in the kernel already."""
    kexec_loaded(sandbox, "1")
    setup(sandbox, "kexec", [RUNNING, SUCCESS])
    result = sandbox.run("restart")
    assert result.returncode == 0, result.stderr
    assert sandbox.call_lines()[-1] == "systemctl --no-block kexec"
    assert not any(c.startswith("kexec") for c in sandbox.call_lines())
    assert "kexec into the kernel an action loaded" in result.messages("info")


@pytest.mark.parametrize("loaded", [None, "0"])
def test_kexec_without_a_kernel_reboots_with_an_error(sandbox, loaded):
    if loaded is not None:
        kexec_loaded(sandbox, loaded)
    setup(sandbox, "kexec", [RUNNING, SUCCESS])
    result = sandbox.run("restart")
    assert result.returncode == 0
    assert sandbox.call_lines()[-1] == "systemctl --no-block reboot"
    assert "kexec requested without a kernel file; rebooting instead" in result.messages("error")
    assert not any("No such file" in line for line in result.stderr.splitlines())


@pytest.mark.parametrize("word", ["poweroff", "halt"])
def test_poweroff_and_halt_are_carried_out(sandbox, word):
    setup(sandbox, word, [RUNNING, SUCCESS])
    assert sandbox.run("restart").returncode == 0
    assert sandbox.call_lines()[-1] == f"systemctl --no-block {word}"


def test_a_kernel_kexec_cannot_load_reboots(sandbox):
    setup(sandbox, "kexec", [RUNNING, SUCCESS], files={"kernel": "not a kernel"})
    sandbox.fake("kexec", "exit 1")
    result = sandbox.run("restart")
    assert sandbox.call_lines()[-1] == "systemctl --no-block reboot"
    assert "kexec could not load the kernel; rebooting instead" in result.messages("error")


def test_unknown_request_is_refused_and_nothing_restarts(sandbox):
    restart = setup(sandbox, "halt-and-catch-fire", [RUNNING, SUCCESS])
    result = sandbox.run("restart")
    assert result.returncode == 2
    assert not any(c.startswith("systemctl") for c in sandbox.call_lines())
    assert not (restart / "request").exists()
    assert result.messages("error") == ["unknown restart request; nothing done"]


def test_no_request_does_nothing(sandbox):
    (sandbox.root / "run" / "captainos" / "restart").mkdir(parents=True)
    sandbox.fake("systemctl")
    assert sandbox.run("restart").returncode == 0
    assert sandbox.call_lines() == []


@pytest.mark.parametrize("kind", ["directory", "link to a file", "dangling link", "fifo"])
def test_a_request_that_is_not_a_regular_file_is_refused_and_removed(sandbox, kind):
    """The path unit starts us while `request` exists: one left in place would start us again
    and again, until its start limit made a genuine request go unheard. A link is never
    followed (its target could be any file, and the refusal logs what it read)."""
    restart = setup(sandbox, "reboot", [RUNNING, SUCCESS])
    request = restart / "request"
    request.unlink()
    target = sandbox.tmp / "elsewhere"
    target.write_text("reboot\n")
    if kind == "directory":
        (request / "inner").mkdir(parents=True)
    elif kind == "link to a file":
        request.symlink_to(target)
    elif kind == "dangling link":
        request.symlink_to(sandbox.tmp / "nothing")
    else:
        os.mkfifo(request)
    result = sandbox.run("restart")
    assert result.returncode == 2
    assert not any(c.startswith("systemctl") for c in sandbox.call_lines())
    assert not request.exists() and not request.is_symlink()
    assert target.read_text() == "reboot\n"
    assert result.messages("error") == ["refusing a restart request that is not a regular file; removed it"]
