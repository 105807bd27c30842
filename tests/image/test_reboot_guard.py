"""reboot-guard against the kernel's real seccomp user notification.

A child process (reboot_guard_child.py, a fresh interpreter: pytest's own process may hold
threads, and a new user namespace needs a single-threaded caller) enters a new user
namespace, installs a filter that sends reboot(2) to a listener, hands the listener to the
guard the way runc does (the container state as JSON, the descriptor as SCM_RIGHTS on the
guard's standard input) and calls reboot(2). In its own user namespace the child has no
CAP_SYS_BOOT where the machine is: a call that slipped past the guard fails with EPERM instead
of restarting the host running the test.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from captainos.core.config import Arch
from captainos.stages import tools

CHILD = Path(__file__).with_name("reboot_guard_child.py")
MAGIC1, MAGIC2, MAGIC2B = 0xFEE1DEAD, 672274793, 369367448
RESTART, HALT, POWER_OFF, RESTART2, KEXEC, CAD_OFF = 0x01234567, 0xCDEF0123, 0x4321FEDC, 0xA1B2C3D4, 0x45584543, 0
EPERM, EINVAL = 1, 22

# (what, magic1, magic2, command, errno the caller sees, request written)
CALLS = [
    ("restart", MAGIC1, MAGIC2, RESTART, 0, "reboot"),
    ("power-off", MAGIC1, MAGIC2, POWER_OFF, 0, "poweroff"),
    ("halt", MAGIC1, MAGIC2B, HALT, 0, "halt"),
    ("restart2", MAGIC1, MAGIC2, RESTART2, 0, "reboot"),
    # Go's unix.Reboot passes the command as a sign-extended int: the same call.
    ("sign-extended halt", MAGIC1, MAGIC2, 0xFFFFFFFF_CDEF0123, 0, "halt"),
    ("kexec with nothing loaded", MAGIC1, MAGIC2, KEXEC, EINVAL, ""),
    ("bad magic", 0x1234, MAGIC2, RESTART, EINVAL, ""),
    # Passed to the kernel, which refuses it here: no CAP_SYS_BOOT outside the user namespace.
    ("ctrl-alt-del off", MAGIC1, MAGIC2, CAD_OFF, EPERM, ""),
]

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                reason="reboot(2) and seccomp(2) numbers known for x86_64 and aarch64")


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guard compiled as the tools stage compiles it, for this machine."""
    out = tmp_path_factory.mktemp("guard") / "reboot-guard"
    argv = tools.compile_argv(tools.compiler(Arch.AMD64 if platform.machine() == "x86_64" else Arch.ARM64),
                              "reboot-guard", out)
    result = subprocess.run(argv, cwd=tools.PROGRAMS / "reboot-guard", capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out


def run_guard(guard: Path, tmp_path: Path, loaded: str = "0") -> tuple[list[int] | str, subprocess.CompletedProcess]:
    (tmp_path / "kexec_loaded").write_text(loaded + "\n")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {"RESTART_DIR": str(tmp_path / "restart"), "GUARD_KEXEC_LOADED": str(tmp_path / "kexec_loaded")}
    proc = subprocess.Popen([guard], stdin=ours.fileno(), stderr=subprocess.PIPE, text=True, env=env)
    ours.close()
    calls = json.dumps([call[1:4] for call in CALLS])
    child = subprocess.run([sys.executable, CHILD, str(theirs.fileno()), calls], pass_fds=[theirs.fileno()],
                           capture_output=True, text=True, timeout=60, check=False)
    theirs.close()
    seen = json.loads(child.stdout) if child.returncode == 0 else f"child {child.returncode}: {child.stderr}"
    _, stderr = proc.communicate(timeout=30)  # the guard ends by itself once the child is gone
    return seen, subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def test_reboot_calls_are_answered_as_the_kernel_would_and_requested(guard, tmp_path):
    seen, result = run_guard(guard, tmp_path)
    assert isinstance(seen, list), seen
    assert result.returncode == 0, result.stderr
    for (what, *_, errno, _), got in zip(CALLS, seen, strict=True):
        assert got == errno, (what, got, result.stderr)
    logs = [json.loads(line) for line in result.stderr.splitlines()]
    assert all(entry["prog"] == "reboot-guard" for entry in logs)
    assert logs[0]["msg"] == "watching the reboot calls of an action in the host's PID namespace"
    assert logs[0]["container"] == "action-under-test"
    deferred = [entry["request"] for entry in logs if entry["msg"] == "reboot call deferred until the agent's report"]
    assert deferred == [request for *_, request in CALLS if request]
    assert [e["msg"] for e in logs].count("reboot call refused as the kernel would") == 2
    assert logs[-1]["msg"] == "reboot call that restarts nothing passed to the kernel"
    # The last deferred call's request is the file captainos-restart reads; nothing else is left.
    assert (tmp_path / "restart" / "request").read_text() == "halt\n"
    assert sorted(p.name for p in (tmp_path / "restart").iterdir()) == ["request"]
    assert (tmp_path / "restart").stat().st_mode & 0o777 == 0o700


def test_kexec_is_deferred_when_a_kernel_is_loaded(guard, tmp_path):
    seen, result = run_guard(guard, tmp_path, loaded="1")
    assert isinstance(seen, list), seen
    kexec = next(i for i, call in enumerate(CALLS) if call[0] == "kexec with nothing loaded")
    assert seen[kexec] == 0, result.stderr
    deferred = [json.loads(line).get("request") for line in result.stderr.splitlines()]
    assert "kexec" in deferred


def test_a_connection_without_a_descriptor_is_one_error(guard):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.sendall(b'{"pid": 1}')
    theirs.close()
    result = subprocess.run([guard], stdin=ours.fileno(), capture_output=True, text=True, timeout=30, check=False)
    ours.close()
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["msg"] == "no seccomp descriptor from runc; this container's reboot calls fail"
    assert entry["error"] == "0 descriptors, not 1"


@pytest.mark.parametrize(("sent", "logged"), [
    (b"action-\xc3\xa9t\xe2\x82\xac-\xf0\x9f\x93\xa6", "action-ét€-📦"),  # UTF-8 as it is
    (b"action-\xff\xc3\xa9", "action-???"),  # a byte no UTF-8 text holds
    (b"action-\xc0\xaf\xc3\xa9", "action-????"),  # an overlong "/"
    (b"action-\xed\xa0\x80", "action-???"),  # a surrogate
    (b"action-\xf4\x90\x80\x80", "action-????"),  # above U+10FFFF
    (b"action-\xe2\x82", "action-??"),  # cut short
])
def test_log_lines_stay_json_whatever_bytes_the_container_id_holds(guard, sent, logged):
    """The container ID comes from runc's state as bytes: a line with bytes that are not UTF-8
    is no JSON at all, so they become "?" (as in the shell programs' log lines)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    state = b'{"pid": 1, "state": {"id": "' + sent + b'", "pid": 1}}'
    socket.send_fds(theirs, [state], [read_end])
    for fd in (read_end, write_end):  # a hung-up descriptor: the guard logs the ID, then ends
        os.close(fd)
    result = subprocess.run([guard], stdin=ours.fileno(), capture_output=True, timeout=30, check=False)
    ours.close()
    theirs.close()
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    entry = json.loads(line.decode("utf-8", errors="strict"))
    assert entry["msg"] == "watching the reboot calls of an action in the host's PID namespace"
    assert entry["container"] == logged
