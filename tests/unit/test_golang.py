"""The Go toolchain `setup` installs: the pinned golang.org/toolchain zip from a (local) module
proxy, verified by sha256, unpacked with executable bits, replacing an older tree only when
whole; and the version check that refuses a Go too old for the pinned modules."""

import dataclasses
import hashlib
import io
import zipfile

import pytest

from captainos import golang, pins
from captainos.config import Arch
from captainos.errors import CaptainError

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


def test_a_go_too_old_for_the_modules_is_one_clear_error(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "go").write_text(_fake_go("1.19.8"))
    (bindir / "go").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(golang, "GO_FALLBACK", tmp_path / "none" / "go")
    golang.go_binary.cache_clear()
    try:
        with pytest.raises(CaptainError) as err:
            golang.go_binary()
    finally:
        golang.go_binary.cache_clear()
    assert f"Go >= {pins.GO_TOOLCHAIN.minimum} is needed" in err.value.message
    assert f"{bindir / 'go'} is 1.19.8" in err.value.message and "setup" in (err.value.hint or "")


def test_versions_compare_as_numbers():
    assert golang.version_tuple("go1.26.10") > golang.version_tuple("1.26.9")
    assert golang.version_tuple("go1.27rc1") >= golang.version_tuple("1.27")
    assert golang.version_tuple("1.26.3") >= golang.version_tuple(pins.GO_TOOLCHAIN.minimum)
    assert golang.version_tuple(pins.GO_TOOLCHAIN.version) >= golang.version_tuple(pins.GO_TOOLCHAIN.minimum)


def test_the_pin_names_the_proxy_path_of_each_arch():
    pin = pins.GO_TOOLCHAIN
    assert pin.zip_url("https://proxy.golang.org/", "arm64") == (
        f"https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go{pin.version}.linux-arm64.zip")
    assert set(pin.sha256) == {"amd64", "arm64"} and all(len(d) == 64 for d in pin.sha256.values())


def test_the_builder_container_installs_the_same_go():
    from captainos import docker

    assert f"ARG GO_VERSION={pins.GO_TOOLCHAIN.version}\n" in docker.DOCKERFILE.read_text()
