"""Programs of github.com/tinkerbell/tinkerbell built from the Go module proxy's sources: the
real tink-agent (the image runs it) and the real Tinkerbell server (the lab runs it); and
helm (the lab renders the Helm chart's nginx configuration with it), built the same way.

`go install .../cmd/agent@v0.25.0` is refused (the root go.mod replaces the api module with
`./api`, which is not in the root module's zip), so: download the root module and every
module it must be joined with, verify their go.sum hashes against pins.py, copy the root
module somewhere writable, point each replace at a downloaded module and build a static
binary. The result is cached by every input.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import golang

LDFLAGS = "-s -w"


@dataclass(frozen=True)
class Program:
    """One command of a module (the tinkerbell module unless named) and how it is built."""

    binary: str  # file name in the cache entry
    package: str  # ./cmd/...
    replaces: tuple[tuple[str, pins.GoModulePin], ...]  # (module path in go.mod, module that stands in)
    tags: tuple[str, ...] = ()
    module: pins.GoModulePin = pins.TINK_AGENT

    @property
    def modules(self) -> tuple[pins.GoModulePin, ...]:
        return (self.module, *(pin for _, pin in self.replaces))


AGENT = Program("tink-agent", pins.TINK_AGENT_PACKAGE, ((pins.TINK_AGENT_API.path, pins.TINK_AGENT_API),))
TINKERBELL = Program("tinkerbell", pins.TINKERBELL_PACKAGE,
                     ((pins.TINK_AGENT_API.path, pins.TINK_AGENT_API), (pins.QUAMINA_PATH, pins.QUAMINA)),
                     tags=pins.TINKERBELL_TAGS)
HELM = Program("helm", pins.HELM_PACKAGE, (), module=pins.HELM)
BINARY = AGENT.binary


def build_argv(go: str, output: Path, program: Program = AGENT) -> list[str]:
    """The documented build command of a program (run in the writable root module)."""
    tags = [f"-tags={','.join(program.tags)}"] if program.tags else []
    return [go, "build", *tags, "-trimpath", f"-ldflags={LDFLAGS}", "-o", str(output), program.package]


def build(cfg: Config, runner: Runner, *, force: bool = False, program: Program = AGENT) -> Path:
    """Return the cache entry holding the program (static, for cfg.arch) and <binary>.json."""
    env = golang.go_env(cfg.cache_dir, cfg.arch)
    parts = {
        "module": program.module.query, "module_h1": program.module.h1,
        "replaces": {path: [pin.query, pin.h1] for path, pin in program.replaces},
        "package": program.package, "tags": list(program.tags), "ldflags": LDFLAGS,
        "go": golang.go_version(runner, cfg.cache_dir, cfg.arch), "arch": cfg.arch.value,
    }
    info = "agent.json" if program is AGENT else f"{program.binary}.json"

    def produce(work: Path) -> None:
        go = golang.go_binary()
        with log.stage(program.binary, f"{program.module.query} {program.package} for {cfg.arch.value} "
                                       f"({parts['go']})"):
            result = runner.run([go, "mod", "download", "-json", *(pin.query for pin in program.modules)],
                                env=env, cwd=work, capture=True)
            modules = golang.parse_download(result.stdout)
            golang.verify(modules, program.modules)
            src = work / "src"
            shutil.copytree(modules[program.module.path]["Dir"], src, symlinks=True)
            golang.make_writable(src)
            edits = [f"-replace={path}={modules[pin.path]['Dir']}" for path, pin in program.replaces]
            if edits:
                runner.run([go, "mod", "edit", *edits], env=env, cwd=src)
            output = work / program.binary
            runner.run(build_argv(go, output, program), env=env, cwd=src, log_file=work / "build.log")
            shutil.rmtree(src)
            (work / info).write_text(json.dumps({**parts, "size": output.stat().st_size}, indent=1, sort_keys=True))
            log.info(f"    {program.binary}: {log.human_bytes(output.stat().st_size)}")

    entry = cache.cached(cfg.cache_dir, program.binary, cfg.arch.value, parts, force=force, produce=produce)
    binary = entry / program.binary
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise CaptainError(f"cached {program.binary} {binary} is missing", f"remove {entry} and build again")
    return entry
