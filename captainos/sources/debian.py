"""Packages from the Debian archive, verified along the archive's own chain of trust.

InRelease is checked with gpgv against the host's Debian archive keyring; only the signed
text gpgv writes back is parsed. Packages.xz must match the SHA256 InRelease lists for it,
and a .deb must match the SHA256 its Packages record lists. Nothing is used before its
digest matched; verified files are cached by sha256, so a cache hit is a verified file.

Trust root: /usr/share/keyrings/debian-archive-keyring.gpg from the host's
debian-archive-keyring package (installed and verified by the host's apt). Bookworm's
package (2023.3+deb12u2) already carries the trixie signing keys.
"""

from __future__ import annotations

import email.utils
import lzma
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from captainos.core import pins
from captainos.core.errors import CaptainError
from captainos.core.run import Runner, run
from captainos.sources import fetch

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TIMEOUT = 60.0


# --- downloads ---------------------------------------------------------------------------

def fetch_verified(url: str, sha256: str, cache_dir: Path) -> Path:
    """The file at url with this sha256, from the cache (downloads/<sha256>/<name>) or the network."""
    return fetch.download(url, cache_dir / "downloads" / sha256 / url.rsplit("/", 1)[-1], sha256)


# --- Debian versions ---------------------------------------------------------------------

def compare_versions(a: str, b: str) -> int:
    """Debian version order (epoch, upstream, revision): -1, 0 or 1, as dpkg itself decides."""
    if run(["dpkg", "--compare-versions", a, "eq", b], check=False).returncode == 0:
        return 0
    return 1 if run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0 else -1


# --- control files -----------------------------------------------------------------------

def parse_paragraphs(text: str) -> list[dict[str, str]]:
    """deb822 paragraphs (Packages, Release): field -> value, continuation lines joined by newlines."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, ""
        elif line[0] in " \t" and last:
            current[last] += "\n" + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            current[last] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def depends(self) -> list[str]:
        """Package names of Depends (first alternative, version constraints dropped)."""
        names = []
        for item in self.fields.get("Depends", "").split(","):
            name = item.split("|")[0].split("(")[0].strip().split(":")[0]
            if name:
                names.append(name)
        return names


@dataclass
class Archive:
    """One suite of a Debian mirror, read through its signed InRelease."""

    cache_dir: Path
    suite: str = pins.DEBIAN_RELEASE
    mirror: str = pins.DEBIAN_MIRROR
    keyring: Path = KEYRING
    component: str = "main"
    _release: dict[str, str] | None = field(default=None, init=False, repr=False)
    _indexes: dict[str, list[Package]] = field(default_factory=dict, init=False, repr=False)

    def release(self) -> dict[str, str]:
        """The signed fields of InRelease (fetched fresh each run: it is what moves)."""
        if self._release is None:
            work = self.cache_dir / "debian" / self.suite
            raw = fetch.get(f"{self.mirror}/dists/{self.suite}/InRelease", work / "InRelease")
            self._release = verify_inrelease(raw, self.keyring, self.suite)
        return self._release

    def _index_digest(self, path: str) -> str:
        for line in self.release().get("SHA256", "").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == path:
                return parts[0]
        raise CaptainError(f"{path} is not listed in the InRelease of {self.suite} at {self.mirror}")

    def packages(self, arch: str) -> list[Package]:
        if arch not in self._indexes:
            path = f"{self.component}/binary-{arch}/Packages.xz"
            sha256 = self._index_digest(path)
            if self.release().get("Acquire-By-Hash") == "yes":
                url = f"{self.mirror}/dists/{self.suite}/{path.rsplit('/', 1)[0]}/by-hash/SHA256/{sha256}"
            else:
                url = f"{self.mirror}/dists/{self.suite}/{path}"
            dest = fetch.download(url, self.cache_dir / "downloads" / sha256 / "Packages.xz", sha256)
            self._indexes[arch] = parse_packages(lzma.decompress(dest.read_bytes()).decode())
        return self._indexes[arch]

    def package(self, name: str, arch: str) -> Package:
        """The newest version of a package in this suite (arch 'all' ones are in every arch's list)."""
        found = [p for p in self.packages(arch) if p.name == name]
        if not found:
            raise CaptainError(f"package {name} not found in Debian {self.suite}/{self.component} for {arch}",
                               f"check the name at {self.mirror}/dists/{self.suite}/")
        newest = found[0]
        for candidate in found[1:]:
            if compare_versions(candidate.version, newest.version) > 0:
                newest = candidate
        return newest

    def fetch(self, pkg: Package) -> Path:
        return fetch_verified(f"{self.mirror}/{pkg.filename}", pkg.sha256, self.cache_dir)


def parse_packages(text: str) -> list[Package]:
    out = []
    for para in parse_paragraphs(text):
        if {"Package", "Version", "Filename", "SHA256", "Size"} <= para.keys():
            out.append(Package(para["Package"], para["Version"], para.get("Architecture", ""),
                               para["Filename"], para["SHA256"], int(para["Size"]), para))
    return out


def verify_inrelease(path: Path, keyring: Path, suite: str, now: datetime | None = None) -> dict[str, str]:
    """gpgv-check a clearsigned InRelease and return the fields of its signed text only."""
    if not keyring.is_file():
        raise CaptainError(f"Debian archive keyring {keyring} not found", "install the debian-archive-keyring package")
    signed = path.with_name(path.name + ".verified")
    signed.unlink(missing_ok=True)
    result = run(["gpgv", "--keyring", keyring, "--output", signed, path],
                 log_file=path.with_name("gpgv.log"), check=False)
    if result.returncode != 0 or not signed.is_file():
        raise CaptainError(f"the signature of {path} does not verify against {keyring}",
                           f"gpgv's output is in {path.with_name('gpgv.log')}; nothing from it was used")
    paras = parse_paragraphs(signed.read_text())
    fields = paras[0] if paras else {}
    if suite not in (fields.get("Suite"), fields.get("Codename")):
        raise CaptainError(f"InRelease names suite {fields.get('Suite')!r}/{fields.get('Codename')!r}, "
                           f"not {suite!r}", "the mirror served the wrong release file")
    if "Valid-Until" in fields:
        until = email.utils.parsedate_to_datetime(fields["Valid-Until"])
        if until < (now or datetime.now(UTC)):
            raise CaptainError(f"the InRelease of {suite} expired on {fields['Valid-Until']}",
                               "the mirror is stale; use another one")
    return fields


def package(name: str, arch: str, suite: str = pins.DEBIAN_RELEASE, *, cache_dir: Path,
            pin: pins.DebPin | None = None, component: str = "main", mirror: str = pins.DEBIAN_MIRROR,
            keyring: Path = KEYRING) -> Path:
    """The one way to a Debian package: its verified .deb, cached by its sha256.

    With a pin, the pinned file and digest (a version frozen in pins.py); without one, the
    newest `name` for `arch` in `suite`, its digest taken from the signed archive index.
    """
    if pin is not None:
        if pin.name != name:
            raise CaptainError(f"pin {pin.name} {pin.version} asked for package {name}")
        return fetch_verified(f"{mirror}/{pin.filename}", pin.sha256, cache_dir)
    archive = Archive(cache_dir, suite=suite, mirror=mirror, keyring=keyring, component=component)
    return archive.fetch(archive.package(name, arch))


def extract(runner: Runner, deb: Path, dest: Path) -> None:
    """Unpack a .deb's file tree (no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    runner.run(["dpkg-deb", "-x", deb, dest])
