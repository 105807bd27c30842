"""The one place that starts processes: argv lists, explicit env, stdin closed.

- `run()`: a command to completion (text), `pipe()`: bytes through a filter (zstd),
  `spawn()`/`stop()`/`wait()`: a long-running process (registry, servers, QEMU).
A Runner decides *where* a command runs (the host, or the builder container); the stages
never care which. No other module imports subprocess (tests/unit/test_layout.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from captainos.core import log
from captainos.core.errors import CaptainError

T = TypeVar("T")

# Host variables a child may need; everything else must be passed explicitly. Of Go's, only the
# proxy: golang.go_env sets the rest (GOFLAGS, GOSUMDB, GONOSUMDB... are never the host's).
PASSTHROUGH_ENV = (
    "PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "GOPROXY",
)


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra or {})
    return env


def quote(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(str(a) for a in argv)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
    check: bool = True,
    log_file: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    secret: Sequence[str] = (),
    input_text: str | None = None,
    capture_stderr: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run argv; on failure raise one line naming the command and its exit code.

    capture: return stdout (stderr is passed through unless log_file is set).
    log_file: write stdout+stderr there, calling on_line for each line (progress).
    secret: strings never printed in the debug line or the error message.
    input_text: fed on stdin (for secrets that must not appear on an argv); else stdin is closed.
    capture_stderr: return stderr too instead of passing it through (with capture).
    """
    args = [str(a) for a in argv]
    shown = quote(args)
    for word in secret:
        if word:
            shown = shown.replace(word, "***")
    full_env = base_env(env)
    extra = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(extra.items()))
    log.debug(f"{prefix + ' ' if prefix else ''}{shown}" + (f"  (in {cwd})" if cwd else ""))
    if shutil.which(args[0], path=full_env.get("PATH")) is None and "/" not in args[0]:
        raise CaptainError(f"command not found: {args[0]}", "run './build.py setup' to install prerequisites")
    try:
        if log_file is not None:
            result = _run_logged(args, full_env, cwd, log_file, on_line, timeout)
        else:
            result = subprocess.run(
                args, env=full_env, cwd=cwd, text=True, timeout=timeout, check=False,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture_stderr else None,
                **({"input": input_text} if input_text is not None else {"stdin": subprocess.DEVNULL}),
            )
    except subprocess.TimeoutExpired as exc:
        raise CaptainError(f"command timed out after {timeout}s: {shown}") from exc
    except FileNotFoundError as exc:
        raise CaptainError(f"command not found: {args[0]}") from exc
    if check and result.returncode != 0:
        where = f"; full log: {log_file}" if log_file else ""
        raise CaptainError(f"command failed with exit code {result.returncode}: {shown}{where}")
    return result


def _run_logged(
    args: list[str], env: dict[str, str], cwd: Path | None, log_file: Path,
    on_line: Callable[[str], None] | None, timeout: float | None,
) -> subprocess.CompletedProcess[str]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    finished = threading.Event()
    if on_line is None:  # a command that reports nothing here (go build, mkosi) still says it runs
        threading.Thread(target=_heartbeat, args=(args, log_file, finished), daemon=True).start()
    try:
        with log_file.open("w") as sink, subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                if on_line:
                    on_line(line.rstrip("\n"))
            rc = proc.wait(timeout=timeout)
    finally:
        finished.set()
    return subprocess.CompletedProcess(args, rc)


HEARTBEAT = 60.0  # seconds between "still running" lines of a logged command


def _heartbeat(args: list[str], log_file: Path, finished: threading.Event) -> None:
    start = time.monotonic()
    while not finished.wait(HEARTBEAT):
        log.info(f"    still running after {log.human_seconds(time.monotonic() - start)}: "
                 f"{Path(args[0]).name} {' '.join(args[1:3])} (log: {log_file})")


def pipe(argv: Sequence[str | os.PathLike[str]], data: bytes, *, what: str = "data",
         error: str | None = None) -> bytes:
    """argv's stdout for data on its stdin (a filter such as zstd); when it fails, one line:
    `error` (default: which filter failed on `what`) and the filter's own message."""
    args = [str(a) for a in argv]
    log.debug(f"{quote(args)}  (< {len(data)} bytes of {what})")
    try:
        result = subprocess.run(args, input=data, capture_output=True, env=base_env(), check=False)
    except FileNotFoundError as exc:
        raise CaptainError(f"command not found: {args[0]}", "run './build.py setup' to install prerequisites") \
            from exc
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise CaptainError(f"{error or f'{args[0]} failed on {what}'}: {message or f'exit code {result.returncode}'}")
    return result.stdout


Process = subprocess.Popen[bytes]


def spawn(argv: Sequence[str | os.PathLike[str]], log_file: Path, *,
          env: Mapping[str, str] | None = None, secret: Sequence[str] = (), truncate: bool = False) -> Process:
    """Start a daemon (a server that outlives this call): stdin closed, stdout and stderr
    appended to log_file (emptied first with truncate), its own session so that a terminal's
    Ctrl-C reaches only us. secret: strings never printed in the debug line."""
    args = [str(a) for a in argv]
    shown = quote(args)
    for word in secret:
        if word:
            shown = shown.replace(word, "***")
    log.debug(shown + f"  (log: {log_file})")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb" if truncate else "ab") as sink:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                env=base_env(env), start_new_session=True)


def wait(proc: Process, timeout: float) -> int | None:
    """The exit code of proc, or None when it is still running after timeout seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def poll(check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T | None:
    """check()'s first answer that is not None, asked every interval seconds; None when it has
    none after timeout seconds. The one wait loop: callers say what a timeout means."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer is not None or time.monotonic() >= deadline:
            return answer
        time.sleep(interval)


def await_ready(proc: Process | None, ready: Callable[[], bool], timeout: float, interval: float = 0.2) -> str:
    """How a spawned server's start ended: "ready" once ready() holds, "exited" when the
    process ended first, "timeout" when neither happened within timeout seconds."""
    def check() -> str | None:
        if proc is not None and proc.poll() is not None:
            return "exited"
        return "ready" if ready() else None

    return poll(check, timeout, interval) or "timeout"


def stop(proc: Process | None, grace: float = 10.0) -> None:
    """TERM a spawned daemon, KILL it if it is still there after grace seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    if wait(proc, grace) is None:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Runner:
    """Runs commands natively; DockerRunner wraps the same argv in the builder container."""

    def wrap(self, argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str],
             cwd: Path | None = None) -> tuple[list[str], dict[str, str], Path | None]:
        """(argv, environment, working directory) of the process to start."""
        return [str(a) for a in argv], dict(env), cwd

    def run(self, argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
            cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        wrapped, wrapped_env, wrapped_cwd = self.wrap(argv, env or {}, cwd)
        return run(wrapped, env=wrapped_env, cwd=wrapped_cwd, **kwargs)


@dataclass(frozen=True)
class DockerRunner(Runner):
    """Runs each command in the builder image, with the repo and cache mounted at the same paths."""

    image: str = ""
    mounts: tuple[Path, ...] = field(default_factory=tuple)

    def wrap(self, argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str],
             cwd: Path | None = None) -> tuple[list[str], dict[str, str], Path | None]:
        # The working directory is the container's (-w); the docker client runs anywhere.
        workdir = Path(cwd).resolve() if cwd is not None else Path.cwd()
        return docker_run_argv(self.image, argv, env=env, mounts=self.mounts, workdir=workdir), {}, None


def docker_run_argv(
    image: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str],
    mounts: Sequence[Path],
    workdir: Path,
    interactive: bool = False,
) -> list[str]:
    """The `docker run` argv that runs argv in the builder container.

    Privileged because mkosi needs loop devices and mounts; paths are mounted at the same
    location so that every path the stages compute stays valid inside the container.
    """
    cmd = ["docker", "run", "--rm", "--privileged", "--network=host"]
    cmd += ["-it"] if interactive else ["-i"]
    for mount in sorted({Path(m).resolve() for m in mounts}):
        cmd += ["-v", f"{mount}:{mount}"]
    for key, value in sorted(env.items()):
        cmd += ["-e", f"{key}={value}"]
    cmd += ["-w", str(workdir), image]
    return cmd + [str(a) for a in argv]
