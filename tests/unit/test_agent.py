"""Building the real tink-agent: go command lines, download parsing, hash checks, cache entries.

The commands are faked here (no network); tests/e2e/test_agent_wire.py builds the real one.
"""

import json
import subprocess
from pathlib import Path

import pytest

from captainos.core import config, pins
from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import agent
from captainos.sources import golang


def download_json(root_dir, api_dir, root_sum=pins.TINK_AGENT.h1):
    return "\n".join(json.dumps(obj, indent="\t") for obj in (
        {"Path": pins.TINK_AGENT.path, "Version": pins.TINK_AGENT.version, "Dir": str(root_dir), "Sum": root_sum},
        {"Path": pins.TINK_AGENT_API.path, "Version": pins.TINK_AGENT_API.version, "Dir": str(api_dir),
         "Sum": pins.TINK_AGENT_API.h1},
    )) + "\n"


def test_parse_download_reads_concatenated_objects(tmp_path):
    found = golang.parse_download(download_json(tmp_path / "a", tmp_path / "b"))
    assert set(found) == {pins.TINK_AGENT.path, pins.TINK_AGENT_API.path}
    assert found[pins.TINK_AGENT_API.path]["Dir"] == str(tmp_path / "b")


def test_parse_download_reports_the_proxy_error():
    text = json.dumps({"Path": pins.TINK_AGENT.path, "Version": "v9", "Error": "410 Gone"})
    with pytest.raises(CaptainError, match="410 Gone"):
        golang.parse_download(text)


def test_verify_refuses_a_different_hash(tmp_path):
    modules = golang.parse_download(download_json(tmp_path, tmp_path, root_sum="h1:evil="))
    with pytest.raises(CaptainError, match="pinned"):
        golang.verify(modules, (pins.TINK_AGENT, pins.TINK_AGENT_API))
    with pytest.raises(CaptainError, match="did not return"):
        golang.verify({}, (pins.TINK_AGENT,))


def test_build_argv_and_env(tmp_path):
    argv = agent.build_argv("go", tmp_path / "tink-agent")
    assert argv == ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(tmp_path / "tink-agent"), "./cmd/agent"]
    env = golang.go_env(tmp_path, Arch.ARM64)
    assert env["CGO_ENABLED"] == "0" and env["GOARCH"] == "arm64" and env["GOOS"] == "linux"
    assert env["GOMODCACHE"] == str(tmp_path / "go" / "mod") and env["GOCACHE"] == str(tmp_path / "go" / "build")
    assert env["GOTOOLCHAIN"] == "local"


class FakeGo(Runner):
    """Answers the go commands agent.build runs, recording them; the modules are read-only dirs."""

    def __init__(self, tmp: Path) -> None:
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "root", tmp / "mod" / "root")
        object.__setattr__(self, "api", tmp / "mod" / "api")
        for d in (self.root, self.api):
            (d / "cmd" / "agent").mkdir(parents=True)
            (d / "go.mod").write_text("module x\n")
            (d / "go.mod").chmod(0o444)

    def run(self, argv, *, env=None, cwd=None, **kwargs):
        argv = [str(a) for a in argv]
        self.calls.append((argv, dict(env or {}), cwd))
        out = ""
        if argv[1:3] == ["env", "GOVERSION"]:
            out = "go1.26.8\n"
        elif argv[1:3] == ["mod", "download"]:
            out = download_json(self.root, self.api)
        elif argv[1:3] == ["mod", "edit"]:
            gomod = Path(cwd) / "go.mod"
            gomod.write_text(gomod.read_text() + argv[3] + "\n")  # fails if the copy is read-only
        elif argv[1] == "build":
            out_path = Path(argv[argv.index("-o") + 1])
            out_path.write_bytes(b"\x7fELF")
            out_path.chmod(0o755)
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_build_joins_the_modules_and_caches_the_binary(tmp_path, monkeypatch):
    monkeypatch.setattr(golang, "go_binary", lambda: "go")
    cfg = config.Config(cache_dir=tmp_path / "cache")
    fake = FakeGo(tmp_path)
    entry = agent.build(cfg, fake)
    assert (entry / "tink-agent").read_bytes() == b"\x7fELF"
    info = json.loads((entry / "agent.json").read_text())
    assert info["module"] == "github.com/tinkerbell/tinkerbell@v0.25.0" and info["go"] == "go1.26.8"
    edit = next(c for c in fake.calls if c[0][1:3] == ["mod", "edit"])
    assert edit[0][3] == f"-replace={pins.TINK_AGENT_API.path}={fake.api}"
    build = next(c for c in fake.calls if c[0][1] == "build")
    assert build[2] == edit[2] and build[1]["CGO_ENABLED"] == "0"
    assert not (entry / "src").exists()  # the writable source copy is not kept
    # Second call: a cache hit, nothing downloaded or built.
    fake.calls.clear()
    assert agent.build(cfg, fake) == entry
    assert [c[0][1] for c in fake.calls] == ["env"]


def test_a_different_go_version_is_a_new_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(golang, "go_binary", lambda: "go")
    cfg = config.Config(cache_dir=tmp_path / "cache")
    first = agent.build(cfg, FakeGo(tmp_path / "a"))
    monkeypatch.setattr(golang, "go_version", lambda *a: "go1.27.0")
    assert agent.build(cfg, FakeGo(tmp_path / "b")) != first


def test_helm_builds_from_its_own_module_with_nothing_replaced(tmp_path, monkeypatch):
    """A program of another module (helm): that module is downloaded, checked and built, and
    its go.mod is left as it is (no replaces: no `go mod edit`, which refuses no arguments)."""
    monkeypatch.setattr(golang, "go_binary", lambda: "go")
    cfg = config.Config(cache_dir=tmp_path / "cache")
    fake = FakeGo(tmp_path)
    helm_dir = tmp_path / "mod" / "helm"
    (helm_dir / "cmd" / "helm").mkdir(parents=True)
    (helm_dir / "go.mod").write_text("module helm.sh/helm/v4\n")
    original = fake.run

    def run(argv, **kwargs):
        if [str(a) for a in argv][1:3] == ["mod", "download"]:
            fake.calls.append(([str(a) for a in argv], {}, kwargs.get("cwd")))
            out = json.dumps({"Path": pins.HELM.path, "Version": pins.HELM.version, "Dir": str(helm_dir),
                              "Sum": pins.HELM.h1})
            return subprocess.CompletedProcess(argv, 0, out, "")
        return original(argv, **kwargs)
    object.__setattr__(fake, "run", run)
    entry = agent.build(cfg, fake, program=agent.HELM)
    assert (entry / "helm").read_bytes() == b"\x7fELF"
    info = json.loads((entry / "helm.json").read_text())
    assert info["module"] == pins.HELM.query and info["package"] == "./cmd/helm" and info["replaces"] == {}
    assert not [c for c in fake.calls if c[0][1:3] == ["mod", "edit"]]
    download = next(c for c in fake.calls if c[0][1:3] == ["mod", "download"])
    assert download[0][-1] == pins.HELM.query
