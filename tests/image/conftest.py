"""Run the in-image programs on the build host against a temporary root.

Each program reads the kernel command line from CMDLINE_FILE, writes under ROOT and finds
lib.sh through CAPTAINOS_LIB; external commands (ctr, nerdctl, journalctl, logger, the agent)
are fake scripts on PATH that record their argv and environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "image"
PROGRAMS = IMAGE / "mkosi.extra" / "usr" / "lib" / "captainos"
LIB = PROGRAMS / "lib.sh"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def logs(self) -> list[dict[str, str]]:
        """Every stderr line parsed as JSON (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.strip()]

    def messages(self, level: str | None = None) -> list[str]:
        return [entry["msg"] for entry in self.logs() if level is None or entry["level"] == level]


class Sandbox:
    """A temp root, a command line file and a bin dir of fake commands."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.bin = tmp / "bin"
        self.calls = tmp / "calls.log"
        self.cmdline_file = tmp / "cmdline"
        self.root.mkdir()
        self.bin.mkdir()
        self.env: dict[str, str] = {}

    def cmdline(self, text: str) -> None:
        self.cmdline_file.write_text(text)

    def fake(self, name: str, body: str = "") -> Path:
        """A fake command that appends 'name argv...' to calls.log, then runs body (bash)."""
        path = self.bin / name
        path.write_text(f'#!/bin/bash\nprintf "%s\\n" "{name} $*" >>"{self.calls}"\n{body}\n')
        path.chmod(0o755)
        return path

    def call_lines(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def run(self, program: str | Path, *args: str, timeout: float = 30) -> Result:
        path = Path(program) if os.sep in str(program) else PROGRAMS / str(program)
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "ROOT": str(self.root), "CMDLINE_FILE": str(self.cmdline_file),
               "CAPTAINOS_LIB": str(LIB), "HOME": str(self.tmp), "CAP_CONSOLE": str(self.tmp / "console"),
               "CAP_KMSG": str(self.tmp / "kmsg"),
               "AGENT_MACHINE": "x86_64", **self.env}
        # Working directory "/", as systemd runs them: a glob in a value would match real paths.
        # A session of its own: a program that hangs is killed with everything it started
        # (a fake that follows forever must not outlive a failed test).
        proc = subprocess.Popen(["bash", str(path), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL, cwd="/", start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return Result(proc.returncode, stdout, stderr)

    def bash(self, script: str, timeout: float = 30) -> Result:
        """Run a bash snippet with lib.sh sourced."""
        snippet = self.tmp / "snippet.sh"
        snippet.write_text(f'set -euo pipefail\n. "$CAPTAINOS_LIB"\n{script}\n')
        return self.run(snippet, timeout=timeout)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)
