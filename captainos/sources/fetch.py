"""Download, verify, then use: pinned downloads and safe archive extraction.

- `probe(url)`: does the host answer at all (a quick HEAD)?
- `get(url, dest)`: a small file whose digest is not known beforehand (InRelease,
  sha256sums.asc); the caller verifies its content (a signature) before using anything in it.
- `download(url, dest, sha256)`: stream to a temp file beside dest with progress, refuse a
  short body (fewer bytes than Content-Length) and a digest mismatch, then rename into place.
  A dest that already has the digest is reused without touching the network. The temp file
  is `.<name>.partial-<pid>`; those of killed downloads are removed, a running one's is kept.
- `safe_extract(archive, dest, keep)`: unpack regular files of a tar archive after checking
  every member: no absolute paths, no `..`, no device nodes, no link pointing outside the
  archive. Links are never created, so nothing written can escape dest.

Every failure is one CaptainError; nothing partial is left where a later run would trust it.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import posixpath
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from captainos.core import cache, log
from captainos.core.errors import CaptainError

TIMEOUT = 60.0
CHUNK = 1 << 20


def probe(url: str, timeout: float = 5.0) -> str | None:
    """None when the host answers a HEAD request with any HTTP status, else why it did not."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # an HTTP error status is still an answer
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        return str(getattr(exc, "reason", exc)) or type(exc).__name__


def get(url: str, dest: Path, *, timeout: float = TIMEOUT) -> Path:
    """A small file whose digest is not known beforehand (InRelease, sha256sums.asc): its
    content is verified by the caller before anything in it is used."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raise CaptainError(f"cannot download {url}: HTTP {exc.code} {exc.reason}",
                           "check the URL or the mirror") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CaptainError(f"cannot download {url}: {getattr(exc, 'reason', exc)}",
                           "check the network or the mirror") from None
    cache.atomic_write(dest, data)
    return dest


def download(url: str, dest: Path, sha256: str, *, label: str | None = None, timeout: float = TIMEOUT) -> Path:
    """dest holding exactly the bytes with this sha256, fetched from url when not already there."""
    if dest.is_file() and cache.sha256_file(dest) == sha256:
        log.debug(f"already downloaded: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in cache.stale_partials(dest.parent, f".{dest.name}"):
        log.debug(f"removing interrupted download {stale}")
        cache.discard(stale)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        digest, done, total = _stream(url, tmp, label or dest.name, timeout)
        if total is not None and done != total:
            raise CaptainError(f"download of {url} was truncated: got {done} of {total} bytes",
                               "the connection dropped; run again (nothing was kept)")
        if digest != sha256:
            raise CaptainError(f"sha256 mismatch for {url}: expected {sha256}, got {digest}",
                               "the file is corrupt or not the pinned one; nothing was kept")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, sink_path: Path, label: str, timeout: float) -> tuple[str, int, int | None]:
    """Copy url's body to sink_path: (sha256, bytes received, Content-Length or None)."""
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, sink_path.open("wb") as sink:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = log.Progress(label, total)
            try:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except http.client.IncompleteRead as exc:
                        chunk = exc.partial
                        sink.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        break
                    if not chunk:
                        break
                    sink.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress.update(done)
            finally:
                progress.close()
    except urllib.error.HTTPError as exc:
        raise CaptainError(f"cannot download {url}: HTTP {exc.code} {exc.reason}",
                           "check the URL, the pinned version or the mirror") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise CaptainError(f"cannot download {url}: {getattr(exc, 'reason', exc)}",
                           "check the network, or point the mirror option at a reachable host") from None
    return digest.hexdigest(), done, total


def parse_sha256sums(text: str) -> dict[str, str]:
    """name -> sha256 from a sha256sum-format list (kernel.org's sha256sums.asc: only the
    signed body of the clearsigned file)."""
    body = text.split("-----BEGIN PGP SIGNATURE-----")[0]
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})\s+\*?(\S+)\s*$", body, re.MULTILINE)}


def _unsafe(name: str) -> bool:
    """An archive path that is absolute or climbs out of the extraction root."""
    if name.startswith("/") or "\\" in name:
        return True
    return ".." in posixpath.normpath(name).split("/")


def check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Refuse the whole archive when any member could write or point outside the root."""
    for member in members:
        if _unsafe(member.name):
            raise CaptainError(f"unsafe path {member.name!r} in {archive.name}", "the archive was refused")
        if member.isdev():
            raise CaptainError(f"device or fifo {member.name!r} in {archive.name}", "the archive was refused")
        if member.issym():
            target = posixpath.join(posixpath.dirname(member.name), member.linkname)
            if member.linkname.startswith("/") or _unsafe(target):
                raise CaptainError(f"symlink {member.name!r} -> {member.linkname!r} in {archive.name} "
                                   "points outside the archive", "the archive was refused")
        if member.islnk() and _unsafe(member.linkname):
            raise CaptainError(f"hard link {member.name!r} -> {member.linkname!r} in {archive.name} "
                               "points outside the archive", "the archive was refused")


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Extract the regular files of a tar archive (gzip/xz/bzip2/plain) that keep() selects.

    Returns the member names written, relative to dest. Modes are kept (minus setuid/setgid
    bits); owners are not. A selected member that is a link is refused, since links are never
    created. dest must be a fresh directory.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written: list[str] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            check_members(archive, members)
            for member in members:
                name = posixpath.normpath(member.name)
                if member.isdir() or name == "." or (keep is not None and not keep(name)):
                    continue
                if not member.isfile():
                    raise CaptainError(f"{member.name!r} in {archive.name} is a link, not a regular file",
                                       "only regular files are extracted")
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.parent.resolve().is_relative_to(root):
                    raise CaptainError(f"{member.name!r} in {archive.name} would be written outside {dest}")
                source = tar.extractfile(member)
                assert source is not None  # regular files always have a data stream
                with source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK)
                target.chmod(member.mode & 0o777)
                written.append(name)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise CaptainError(f"cannot extract {archive}: {exc}",
                           "the archive is corrupt or truncated, or the disk is full") from None
    return written


def safe_extract_zip(archive: Path, dest: Path, prefix: str) -> int:
    """Extract a zip whose every member sits under prefix (a Go module zip: "<module>@<version>/")
    into dest, without the prefix; the number of files written. Zip members carry no modes:
    files are written 0644. dest must be a fresh directory."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # refuse the whole archive before writing anything
                if not info.filename.startswith(prefix) or _unsafe(info.filename[len(prefix):]):
                    raise CaptainError(f"unsafe path {info.filename!r} in {archive.name}", "the archive was refused")
            for info in infos:
                name = info.filename[len(prefix):]
                if info.is_dir() or not name:
                    continue
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK)
                count += 1
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise CaptainError(f"cannot extract {archive}: {exc}",
                           "the archive is corrupt or truncated, or the disk is full") from None
    return count
