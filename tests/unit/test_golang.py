"""The Go toolchain `setup` installs: the pinned golang.org/toolchain zip from a (local) module
proxy, verified by sha256, unpacked with executable bits, replacing an older tree only when
whole; and the version check that refuses a Go too old for the pinned modules."""

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from captainos.core import pins
from captainos.core.config import Arch, load
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import golang
from captainos.stages import tools

FAKE = "9.9.9"


def _fake_go(version: str) -> str:
    return f"#!/bin/sh\necho 'go version go{version} linux/amd64'\n"


def _toolchain_zip(version: str = FAKE, extra: dict[str, str] | None = None) -> bytes:
    prefix = f"golang.org/toolchain@v0.0.1-go{version}.linux-amd64/"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(prefix + "bin/go", _fake_go(version))
        zf.writestr(prefix + "pkg/tool/linux_amd64/compile", "#!/bin/sh\n")
        zf.writestr(prefix + "src/fmt/print.go", "package fmt\n")
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return buf.getvalue()


@pytest.fixture
def proxy(http_root, monkeypatch):
    """A module proxy serving one toolchain zip; the pin points at its sha256."""
    root, url = http_root
    data = _toolchain_zip()
    path = root / "golang.org" / "toolchain" / "@v" / f"v0.0.1-go{FAKE}.linux-amd64.zip"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    pin = dataclasses.replace(pins.GO_TOOLCHAIN, version=FAKE, sha256={"amd64": hashlib.sha256(data).hexdigest()})
    monkeypatch.setattr(pins, "GO_TOOLCHAIN", pin)
    return path, url


@pytest.mark.skipif(not Arch.AMD64.is_host(), reason="runs the fake amd64 go")
def test_install_unpacks_verified_executables_and_is_idempotent(proxy, tmp_path):
    _, url = proxy
    target = tmp_path / "usr-local" / "go"
    assert golang.install_toolchain(Arch.AMD64, tmp_path / "cache", target, proxy=url) is True
    assert golang.installed_version(str(target / "bin" / "go")) == FAKE
    assert (target / "pkg" / "tool" / "linux_amd64" / "compile").stat().st_mode & 0o111
    assert not (target / "src" / "fmt" / "print.go").stat().st_mode & 0o111
    assert golang.install_toolchain(Arch.AMD64, tmp_path / "cache", target, proxy=url) is False
    assert sorted(p.name for p in target.parent.iterdir()) == ["go"]  # no temp trees left


@pytest.mark.skipif(not Arch.AMD64.is_host(), reason="runs the fake amd64 go")
def test_an_older_tree_is_replaced(proxy, tmp_path):
    _, url = proxy
    target = tmp_path / "go"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "go").write_text(_fake_go("1.19.8"))
    (target / "bin" / "go").chmod(0o755)
    assert golang.install_toolchain(Arch.AMD64, tmp_path / "cache", target, proxy=url) is True
    assert golang.installed_version(str(target / "bin" / "go")) == FAKE


def test_a_tampered_toolchain_installs_nothing(proxy, tmp_path):
    path, url = proxy
    path.write_bytes(_toolchain_zip(extra={"golang.org/toolchain@v0.0.1-go9.9.9.linux-amd64/bin/evil": "x"}))
    target = tmp_path / "go"
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        golang.install_toolchain(Arch.AMD64, tmp_path / "cache", target, proxy=url)
    assert not target.exists() and not list((tmp_path / "cache" / "downloads").iterdir())


def test_a_zip_that_climbs_out_is_refused_whole(proxy, tmp_path, monkeypatch):
    path, url = proxy
    data = _toolchain_zip(extra={"golang.org/toolchain@v0.0.1-go9.9.9.linux-amd64/../../escape": "x"})
    path.write_bytes(data)
    monkeypatch.setattr(pins, "GO_TOOLCHAIN", dataclasses.replace(
        pins.GO_TOOLCHAIN, sha256={"amd64": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(CaptainError, match="unsafe path"):
        golang.install_toolchain(Arch.AMD64, tmp_path / "cache", tmp_path / "go", proxy=url)
    assert not (tmp_path / "go").exists() and not (tmp_path / "escape").exists()


def _go_dirs(tmp_path: Path, monkeypatch, on_path: str | None, fallback: str | None) -> tuple[Path, Path]:
    """A fake go of version on_path first on PATH, one of version fallback at GO_FALLBACK."""
    paths = []
    for name, version in (("path", on_path), ("fallback", fallback)):
        binary = tmp_path / name / "bin" / "go"
        paths.append(binary)
        if version is not None:
            binary.parent.mkdir(parents=True)
            binary.write_text(_fake_go(version))
            binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{paths[0].parent}:/usr/bin:/bin")
    monkeypatch.setattr(golang, "GO_FALLBACK", paths[1])
    return paths[0], paths[1]


@pytest.fixture(autouse=True)
def _fresh_go_binary():
    golang.go_binary.cache_clear()
    yield
    golang.go_binary.cache_clear()


def test_a_newer_go_on_path_is_not_taken_for_the_pinned_one(tmp_path, monkeypatch):
    # Builds are reproducible only with the pinned compiler: a newer `go` first on PATH is passed over.
    _, pinned = _go_dirs(tmp_path, monkeypatch, on_path="1.27.0", fallback=pins.GO_TOOLCHAIN.version)
    assert golang.go_binary() == str(pinned)


def test_without_the_pinned_go_one_clear_error(tmp_path, monkeypatch):
    on_path, _ = _go_dirs(tmp_path, monkeypatch, on_path="1.27.0", fallback=None)
    with pytest.raises(CaptainError) as err:
        golang.go_binary()
    assert f"Go {pins.GO_TOOLCHAIN.version} (pinned) is needed" in err.value.message
    assert f"{on_path} is 1.27.0" in err.value.message and "setup" in (err.value.hint or "")


needs_go = pytest.mark.skipif(shutil.which("go") is None and not golang.GO_FALLBACK.is_file(),
                              reason="needs the Go toolchain")

_WEAKENING = {"GOFLAGS": "-mod=vendor", "GOSUMDB": "off", "GONOSUMDB": "*", "GONOSUMCHECK": "1",
              "GOPRIVATE": "*", "GONOPROXY": "*", "GOINSECURE": "*", "GOTOOLCHAIN": "auto"}


@needs_go
def test_the_host_environment_cannot_weaken_module_checks(tmp_path, monkeypatch):
    """What `go env` reports under our environment, with every weakening variable set on the
    host, both as environment variables and in the user's go env file."""
    for name, value in _WEAKENING.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "home" / ".config" / "go").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "go" / "env").write_text(
        "".join(f"{name}={value}\n" for name, value in _WEAKENING.items() if name != "GONOSUMCHECK"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load(env={}, flags={"cache_dir": str(tmp_path / "cache")})
    names = ["GOFLAGS", "GOSUMDB", "GONOSUMDB", "GOPRIVATE", "GONOPROXY", "GOINSECURE", "GOTOOLCHAIN"]
    for env, flags in ((golang.go_env(cfg.cache_dir, cfg.arch), ""), (tools.go_env(cfg), "-mod=mod")):
        seen = json.loads(Runner().run([golang.go_binary(), "env", "-json", *names], env=env,
                                       capture=True).stdout)
        assert seen == {"GOFLAGS": flags, "GOSUMDB": "sum.golang.org", "GONOSUMDB": "", "GOPRIVATE": "",
                        "GONOPROXY": "", "GOINSECURE": "", "GOTOOLCHAIN": "local"}
        assert env["GONOSUMCHECK"] == ""


def test_versions_compare_as_numbers():
    assert golang.version_tuple("go1.26.10") > golang.version_tuple("1.26.9")
    assert golang.version_tuple("go1.27rc1") >= golang.version_tuple("1.27")
    assert golang.version_tuple(pins.GO_TOOLCHAIN.version) >= golang.version_tuple(pins.GO_TOOLCHAIN.minimum)


def test_the_pin_names_the_proxy_path_of_each_arch():
    pin = pins.GO_TOOLCHAIN
    assert pin.zip_url("https://proxy.golang.org/", "arm64") == (
        f"https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go{pin.version}.linux-arm64.zip")
    assert set(pin.sha256) == {"amd64", "arm64"} and all(len(d) == 64 for d in pin.sha256.values())


def test_the_builder_container_installs_the_same_go():
    from captainos.core import docker

    assert f"ARG GO_VERSION={pins.GO_TOOLCHAIN.version}\n" in docker.DOCKERFILE.read_text()
