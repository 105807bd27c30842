"""debian.py: version order, control-file parsing, and the signed-archive chain against a
throwaway archive (own GPG key) served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from captainos.core.errors import CaptainError
from captainos.sources import debian, fetch


@pytest.mark.parametrize(("a", "b", "order"), [
    ("1.0", "1.1", -1),
    ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0~rc1", 1),
    ("6.12.117-1", "6.12.107-1", 1),
    ("6.12.9-1", "6.12.10-1", -1),
    ("1:0.1", "2.0", 1),
    ("1.0-1", "1.0-1+b1", -1),
    ("1.0a", "1.0", 1),
    ("1.0a", "1.0+", -1),
    ("2.0-1", "2.0-1", 0),
    ("25.3-7", "25.3-10", -1),
])
def test_compare_versions(a: str, b: str, order: int) -> None:
    assert debian.compare_versions(a, b) == order


def test_parse_paragraphs_joins_continuation_lines() -> None:
    text = "Package: a\nDescription: one\n two\n\nPackage: b\nVersion: 1\n"
    paras = debian.parse_paragraphs(text)
    assert paras == [{"Package": "a", "Description": "one\ntwo"}, {"Package": "b", "Version": "1"}]


def test_depends_keeps_first_alternative_without_versions() -> None:
    pkg = debian.Package("x", "1", "amd64", "f", "0" * 64, 1,
                         {"Depends": "kmod, initramfs-tools (>= 0.120) | linux-initramfs-tool, python3:any"})
    assert pkg.depends == ["kmod", "initramfs-tools", "python3"]


# --- a signed archive on 127.0.0.1 ---------------------------------------------------------

SUITE = "testsuite"


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], input=stdin, check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[Path, Path, Path]]:
    """(signing gpg home, keyring with its public key, keyring of an unrelated key)."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg/gpgv not installed")
    root = Path(tempfile.mkdtemp(prefix="cg"))  # short: gpg-agent's socket path has a length limit
    homes = [root / "a", root / "b"]
    for home, name in zip(homes, ("Test Archive <a@example.org>", "Other <b@example.org>"), strict=True):
        home.mkdir(mode=0o700)
        _gpg(home, "--quick-gen-key", name, "ed25519", "sign", "never")
        (root / f"{home.name}.gpg").write_bytes(_gpg(home, "--export"))
    yield homes[0], root / "a.gpg", root / "b.gpg"
    for home in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    shutil.rmtree(root, ignore_errors=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_archive(root: Path, home: Path, *, debs: dict[str, bytes], suite: str = SUITE,
                 valid_until: str | None = None, tamper_deb: bool = False, tamper_index: bool = False,
                 by_hash: bool = True) -> None:
    """A minimal mirror: dists/<suite>/InRelease -> main/binary-amd64/Packages.xz -> pool/*.deb."""
    paragraphs = []
    for version, data in debs.items():
        filename = f"pool/main/h/hello/hello_{version}_amd64.deb"
        (root / filename).parent.mkdir(parents=True, exist_ok=True)
        (root / filename).write_bytes(data + (b"tampered" if tamper_deb else b""))
        paragraphs.append(f"Package: hello\nVersion: {version}\nArchitecture: amd64\nDepends: libc6 (>= 2.36)\n"
                          f"Filename: {filename}\nSize: {len(data)}\nSHA256: {_sha(data)}\n")
    index = lzma.compress("\n".join(paragraphs).encode())
    bindir = root / "dists" / suite / "main" / "binary-amd64"
    (bindir / "by-hash" / "SHA256").mkdir(parents=True, exist_ok=True)
    served = index + (b"x" if tamper_index else b"")
    (bindir / "Packages.xz").write_bytes(served)
    (bindir / "by-hash" / "SHA256" / _sha(index)).write_bytes(served)
    release = (f"Origin: Test\nSuite: stable\nCodename: {suite}\n"
               f"{'Acquire-By-Hash: yes' if by_hash else ''}\n"
               f"{'Valid-Until: ' + valid_until if valid_until else ''}\n"
               f"SHA256:\n {_sha(index)} {len(index)} main/binary-amd64/Packages.xz\n")
    release = "\n".join(line for line in release.splitlines() if line) + "\n"
    (root / "dists" / suite / "InRelease").write_bytes(_gpg(home, "--clearsign", stdin=release.encode()))


@pytest.fixture()
def mirror(http_root: tuple[Path, str]) -> tuple[Path, str]:
    """(document root, base URL) of the shared HTTP server on 127.0.0.1."""
    return http_root


def _fetch(base: str, cache: Path, keyring: Path, suite: str = SUITE) -> Path:
    return debian.package("hello", "amd64", suite, cache_dir=cache, mirror=base, keyring=keyring)


def test_fetch_package_verifies_and_picks_newest(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0-1": b"old deb", "1.0-10": b"new deb", "1.0-2": b"middle"})
    path = _fetch(base, tmp_path / "cache", keyring)
    assert path.read_bytes() == b"new deb"
    assert path.parent.name == _sha(b"new deb")
    # A second fetch is served from the cache (the mirror's copy is gone).
    (root / "pool/main/h/hello/hello_1.0-10_amd64.deb").unlink()
    assert _fetch(base, tmp_path / "cache", keyring).read_bytes() == b"new deb"


def test_fetch_without_by_hash(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"2.0": b"deb"}, by_hash=False)
    assert _fetch(base, tmp_path / "cache", keyring).read_bytes() == b"deb"


def test_tampered_deb_is_refused_and_not_kept(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"}, tamper_deb=True)
    with pytest.raises(CaptainError, match=r"sha256 mismatch"):
        _fetch(base, tmp_path / "cache", keyring)
    assert not list((tmp_path / "cache" / "downloads").rglob("*.deb"))


def test_tampered_index_is_refused(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"}, tamper_index=True)
    with pytest.raises(CaptainError, match="mismatch"):
        _fetch(base, tmp_path / "cache", keyring)


def test_inrelease_signed_by_unknown_key_is_refused(keys, mirror, tmp_path: Path) -> None:
    home, _, other_keyring = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"})
    with pytest.raises(CaptainError, match="does not verify"):
        _fetch(base, tmp_path / "cache", other_keyring)


def test_edited_inrelease_is_refused(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"})
    inrelease = root / "dists" / SUITE / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Origin: Test", "Origin: Evil"))
    with pytest.raises(CaptainError, match="does not verify"):
        _fetch(base, tmp_path / "cache", keyring)


def test_wrong_suite_is_refused(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"}, suite="othersuite")
    shutil.copytree(root / "dists" / "othersuite", root / "dists" / SUITE)
    with pytest.raises(CaptainError, match="not 'testsuite'"):
        _fetch(base, tmp_path / "cache", keyring)


def test_expired_release_is_refused(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"}, valid_until="Sat, 01 Jan 2000 00:00:00 UTC")
    with pytest.raises(CaptainError, match="expired"):
        _fetch(base, tmp_path / "cache", keyring)


def test_unknown_package_names_the_suite(keys, mirror, tmp_path: Path) -> None:
    home, keyring, _ = keys
    root, base = mirror
    make_archive(root, home, debs={"1.0": b"payload"})
    with pytest.raises(CaptainError, match="package nope not found in Debian testsuite"):
        debian.package("nope", "amd64", SUITE, cache_dir=tmp_path, mirror=base, keyring=keyring)


def test_unreachable_mirror_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CaptainError, match=r"cannot download http://127\.0\.0\.1:9/x"):
        fetch.get("http://127.0.0.1:9/x", tmp_path / "x", timeout=2)
    assert not list(tmp_path.iterdir())


def test_valid_until_in_the_future_passes(keys, tmp_path: Path) -> None:
    home, keyring, _ = keys
    (tmp_path / "InRelease").write_bytes(_gpg(home, "--clearsign", stdin=(
        f"Codename: {SUITE}\nValid-Until: Sat, 01 Jan 2100 00:00:00 UTC\n").encode()))
    fields = debian.verify_inrelease(tmp_path / "InRelease", keyring, SUITE, now=datetime.now(UTC))
    assert fields["Codename"] == SUITE
