"""The real tink-agent, built from the Go module proxy's sources of github.com/tinkerbell/tinkerbell.

`go install .../cmd/agent@v0.25.0` is refused (the root go.mod replaces the api module with
`./api`, which is not in the root module's zip), so: download both modules, verify their
go.sum hashes against pins.py, copy the root module somewhere writable, point the replace at
the downloaded api module and build a static binary. The result is cached by every input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from captainos import cache, golang, log, pins
from captainos.config import Config
from captainos.errors import CaptainError
from captainos.run import Runner

BINARY = "tink-agent"
LDFLAGS = "-s -w"


def build_argv(go: str, output: Path) -> list[str]:
    """The documented build command of the agent (run in the writable root module)."""
    return [go, "build", "-trimpath", f"-ldflags={LDFLAGS}", "-o", str(output), pins.TINK_AGENT_PACKAGE]


def build(cfg: Config, runner: Runner, *, force: bool = False) -> Path:
    """Return the cache entry holding `tink-agent` (static, for cfg.arch) and agent.json."""
    env = golang.go_env(cfg.cache_dir, cfg.arch)
    parts = {
        "module": pins.TINK_AGENT.query, "module_h1": pins.TINK_AGENT.h1,
        "api": pins.TINK_AGENT_API.query, "api_h1": pins.TINK_AGENT_API.h1,
        "package": pins.TINK_AGENT_PACKAGE, "ldflags": LDFLAGS,
        "go": golang.go_version(runner, cfg.cache_dir, cfg.arch), "arch": cfg.arch.value,
    }

    def produce(work: Path) -> None:
        go = golang.go_binary()
        with log.stage("tink-agent", f"{pins.TINK_AGENT.query} for {cfg.arch.value} ({parts['go']})"):
            result = runner.run([go, "mod", "download", "-json", pins.TINK_AGENT.query, pins.TINK_AGENT_API.query],
                                env=env, cwd=work, capture=True)
            modules = golang.parse_download(result.stdout)
            golang.verify(modules, (pins.TINK_AGENT, pins.TINK_AGENT_API))
            src = work / "src"
            shutil.copytree(modules[pins.TINK_AGENT.path]["Dir"], src, symlinks=True)
            golang.make_writable(src)
            api_dir = modules[pins.TINK_AGENT_API.path]["Dir"]
            runner.run([go, "mod", "edit", f"-replace={pins.TINK_AGENT_API.path}={api_dir}"], env=env, cwd=src)
            runner.run(build_argv(go, work / BINARY), env=env, cwd=src, log_file=work / "build.log")
            shutil.rmtree(src)
            (work / "agent.json").write_text(json.dumps({**parts, "size": (work / BINARY).stat().st_size},
                                                        indent=1, sort_keys=True))
            log.info(f"    {BINARY}: {log.human_bytes((work / BINARY).stat().st_size)}")

    entry = cache.cached(cfg.cache_dir, "tink-agent", cfg.arch.value, parts, force=force, produce=produce)
    binary = entry / BINARY
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise CaptainError(f"cached agent {binary} is missing", f"remove {entry} and build again")
    return entry
