"""The Go toolchain as the build uses it: the pinned Go only, one environment (caches under our
cache dir, no toolchain downloads, the checksum database always on, static cross builds),
`go mod download` parsing and go.sum verification.
Shared by the tools stage (containerd, runc, nerdctl, CNI) and the tink-agent build."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from captainos.core import pins
from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, run

GO_ROOT = Path("/usr/local/go")  # where `setup` installs the pinned toolchain
GO_FALLBACK = GO_ROOT / "bin" / "go"


def version_tuple(text: str) -> tuple[int, ...]:
    """(1, 26, 8) from "1.26.8", "go1.26.8" or "go1.26rc1" (a pre-release counts as its base)."""
    digits = re.match(r"(?:go)?(\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in digits.group(1).split(".")) if digits else ()


def installed_version(binary: str) -> str:
    """"1.26.8" from `go version`, or "" when it does not run."""
    if not Path(binary).is_file():
        return ""
    try:
        out = run([binary, "version"], env={"GOTOOLCHAIN": "local"}, capture=True, check=False, timeout=30).stdout
    except (CaptainError, OSError):
        return ""
    found = re.search(r"\bgo(\d+\.\d+(?:\.\d+)?)", out)
    return found.group(1) if found else ""


@functools.lru_cache(maxsize=1)
def go_binary() -> str:
    """The first `go` (PATH, then /usr/local/go) that is the pinned version: another compiler,
    even a newer one, would build other bytes from the same pinned sources."""
    need = pins.GO_TOOLCHAIN.version
    seen = []
    for candidate in (shutil.which("go"), str(GO_FALLBACK) if GO_FALLBACK.is_file() else None):
        if candidate and candidate not in seen:
            seen.append(candidate)
            if version_tuple(installed_version(candidate)) == version_tuple(need):
                return candidate
    found = ", ".join(f"{c} is {installed_version(c) or 'not runnable'}" for c in seen) or "no go on PATH"
    raise CaptainError(f"Go {need} (pinned) is needed to build from Go modules ({found})",
                       f"run './build.py setup' (installs Go {need} into {GO_ROOT})")


def _reports(go: Path, version: str) -> bool:
    """The go binary at this path runs and reports this version."""
    return version_tuple(installed_version(str(go))) == version_tuple(version)


def install_toolchain(arch: Arch, cache_dir: Path, target: Path = GO_ROOT, proxy: str | None = None) -> bool:
    """Install the pinned Go toolchain into target from the Go module proxy, verified by sha256;
    False when target already holds it. The old tree is replaced only once the new one is whole."""
    pin = pins.GO_TOOLCHAIN
    if _reports(target / "bin" / "go", pin.version):
        return False
    from captainos.sources import fetch

    proxy = proxy or os.environ.get("GOPROXY", pins.GO_PROXY).split(",")[0]
    if proxy in ("direct", "off"):
        proxy = pins.GO_PROXY
    version = pin.module_version(arch.go_arch())
    archive = fetch.download(pin.zip_url(proxy, arch.go_arch()), cache_dir / "downloads" / f"go-{version}.zip",
                             pin.sha256[arch.go_arch()], label=f"go {pin.version}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        tree = Path(tmp) / "go"
        fetch.safe_extract_zip(archive, tree, f"golang.org/toolchain@{version}/")
        # Module zips carry no modes: the commands and the compiler's tools are executables.
        for exe in [*(tree / "bin").iterdir(), *(tree / "pkg" / "tool").glob("*/*")]:
            exe.chmod(0o755)
        if arch.is_host() and not _reports(tree / "bin" / "go", pin.version):
            raise CaptainError(f"the unpacked Go toolchain does not report {pin.version}", "nothing was installed")
        old = Path(tmp) / "old"
        if target.exists():
            os.rename(target, old)
        os.rename(tree, target)
    go_binary.cache_clear()
    return True


def go_env(cache_dir: Path, arch: Arch) -> dict[str, str]:
    """Environment of every go command: module and build caches under our cache dir, no toolchain
    downloads, a static cross build for the target architecture. Whatever could weaken the
    module checks is set here, not inherited: no go env file (GOENV=off), no GOFLAGS, every
    module checked against the checksum database, none exempt, none fetched insecurely.
    GOPROXY still comes from the host (a site's own proxy): what it serves is checked all the same."""
    go_dir = cache_dir / "go"
    return {
        "GOMODCACHE": str(go_dir / "mod"),
        "GOCACHE": str(go_dir / "build"),
        "GOENV": "off",
        "GOFLAGS": "",
        "GOSUMDB": pins.GO_SUMDB,
        "GONOSUMDB": "",
        "GONOSUMCHECK": "",
        "GOPRIVATE": "",
        "GONOPROXY": "",
        "GOINSECURE": "",
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
