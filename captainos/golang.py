"""The Go toolchain as the build uses it: one environment (caches under our cache dir, no
toolchain downloads, static cross builds), `go mod download` parsing and go.sum verification.
Shared by the tools stage (containerd, runc, nerdctl, CNI) and the tink-agent build."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from captainos import pins
from captainos.config import Arch
from captainos.errors import CaptainError
from captainos.run import Runner

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


def make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def go_version(runner: Runner, cache_dir: Path, arch: Arch) -> str:
    result = runner.run([go_binary(), "env", "GOVERSION"], env=go_env(cache_dir, arch), capture=True)
    return result.stdout.strip()
