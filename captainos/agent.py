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
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from captainos import cache, log, pins
from captainos.config import Arch, Config
from captainos.errors import CaptainError
from captainos.run import Runner

BINARY = "tink-agent"
LDFLAGS = "-s -w"
GO_FALLBACK = Path("/usr/local/go/bin/go")


def go_binary() -> str:
    found = shutil.which("go")
    if found:
        return found
    if GO_FALLBACK.is_file():
        return str(GO_FALLBACK)
    raise CaptainError("the Go toolchain is not installed", "install Go >= 1.26.3 (see './build.py setup')")


def go_env(cache_dir: Path, arch: Arch) -> dict[str, str]:
    """Environment of every go command: module and build caches under our cache dir, no toolchain
    downloads, a static cross build for the target architecture."""
    go_dir = cache_dir / "go"
    return {
        "GOMODCACHE": str(go_dir / "mod"),
        "GOCACHE": str(go_dir / "build"),
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
        "GOOS": "linux",
        "GOARCH": arch.go_arch(),
    }


def build_argv(go: str, output: Path) -> list[str]:
    """The documented build command of the agent (run in the writable root module)."""
    return [go, "build", "-trimpath", f"-ldflags={LDFLAGS}", "-o", str(output), pins.TINK_AGENT_PACKAGE]


def parse_download(stream: str) -> dict[str, dict[str, Any]]:
    """`go mod download -json` prints one JSON object per module, concatenated: index them by path."""
    decoder = json.JSONDecoder()
    found: dict[str, dict[str, Any]] = {}
    pos = 0
    text = stream.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        if obj.get("Error"):
            raise CaptainError(f"go mod download {obj.get('Path')}@{obj.get('Version')}: {obj['Error']}",
                               "check that the Go module proxy is reachable (GOPROXY)")
        found[obj["Path"]] = obj
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return found


def verify(modules: Mapping[str, Mapping[str, Any]], wanted: tuple[pins.GoModulePin, ...]) -> None:
    """Every pinned module was downloaded and carries the pinned go.sum hash."""
    for pin in wanted:
        mod = modules.get(pin.path)
        if mod is None:
            raise CaptainError(f"go mod download did not return {pin.query}")
        if mod.get("Sum") != pin.h1:
            raise CaptainError(f"{pin.query} has hash {mod.get('Sum')}, pinned {pin.h1}",
                               "the module proxy served different sources; check GOPROXY")


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def go_version(runner: Runner, cache_dir: Path, arch: Arch) -> str:
    result = runner.run([go_binary(), "env", "GOVERSION"], env=go_env(cache_dir, arch), capture=True)
    return result.stdout.strip()


def build(cfg: Config, runner: Runner, *, force: bool = False) -> Path:
    """Return the cache entry holding `tink-agent` (static, for cfg.arch) and agent.json."""
    env = go_env(cfg.cache_dir, cfg.arch)
    parts = {
        "module": pins.TINK_AGENT.query, "module_h1": pins.TINK_AGENT.h1,
        "api": pins.TINK_AGENT_API.query, "api_h1": pins.TINK_AGENT_API.h1,
        "package": pins.TINK_AGENT_PACKAGE, "ldflags": LDFLAGS,
        "go": go_version(runner, cfg.cache_dir, cfg.arch), "arch": cfg.arch.value,
    }

    def produce(work: Path) -> None:
        go = go_binary()
        with log.stage("tink-agent", f"{pins.TINK_AGENT.query} for {cfg.arch.value} ({parts['go']})"):
            result = runner.run([go, "mod", "download", "-json", pins.TINK_AGENT.query, pins.TINK_AGENT_API.query],
                                env=env, cwd=work, capture=True)
            modules = parse_download(result.stdout)
            verify(modules, (pins.TINK_AGENT, pins.TINK_AGENT_API))
            src = work / "src"
            shutil.copytree(modules[pins.TINK_AGENT.path]["Dir"], src, symlinks=True)
            _make_writable(src)
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
