"""Keyed, atomic cache entries: a stage is done only when its entry was renamed into place.

An entry is `<cache>/<stage>/<arch>/<key>/`. It is built in a sibling `*.partial-<pid>`
directory and renamed when complete, so an interrupted build (Ctrl-C, kill, power loss)
leaves nothing a later run can mistake for done. The key hashes every input: a bumped pin or
an edited config file produces a new key and so a rebuild, with no FORCE_* needed.

Builds may share a cache: producing an entry holds an flock on `<key>.lock` beside it, so a
second build of the same key waits, then uses the entry the first one made. A `.partial-<pid>`
is removed only once its process is gone.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import threading
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captainos.core import log
from captainos.core.errors import CaptainError

STAMP = ".captainos-complete.json"


def key(parts: dict[str, Any]) -> str:
    """A short stable digest of the inputs (canonical JSON)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_digest(*modules: str | Path) -> str:
    """The digest of the code that produces an entry: each module's source without its
    comments, docstrings, blank lines and trailing blanks, so editing prose makes no new key
    and changing code does. The text, not the syntax tree: `ast.dump` differs between Python
    versions, and a Python upgrade must not rebuild a kernel. Every stage keys its entries
    with it (no recipe numbers to remember to bump)."""
    digest = hashlib.sha256()
    for module in modules:
        source = Path(module).read_text()
        skip: set[int] = set()  # lines that are all docstring
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)
                    and body[0].lineno != getattr(node, "lineno", 0)):  # not `def f(): "doc"`
                skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
        comment_at = {tok.start[0]: tok.start[1] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                      if tok.type == tokenize.COMMENT}
        kept = []
        for number, line in enumerate(source.splitlines(), 1):
            if number not in skip:
                line = line[:comment_at.get(number, len(line))].rstrip()
                if line:
                    kept.append(line)
        digest.update("\n".join(kept).encode() + b"\0")
    return digest.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> str:
    """Digest of a directory's relative paths, modes, link targets and contents."""
    digest = hashlib.sha256()
    if not root.exists():
        raise CaptainError(f"missing input directory {root}")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        mode = path.lstat().st_mode
        digest.update(f"{rel}\0{mode:o}\0".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def temp_beside(path: Path) -> Path:
    """A temp name beside path that no other process or thread uses (two threads of one
    process may write the same file, e.g. a stage's `last` pointer)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside path and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file (mode included) so that dst is either the old or the whole new file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(dst)
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard(path: Path) -> None:
    """Remove a leftover that another process may be removing at the same time."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """A process with this id exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(directory: Path, name: str) -> list[Path]:
    """The `<name>.partial-<pid>` files and directories in directory whose process is gone:
    leftovers of a killed build or download. A running one's stays where it is."""
    found = []
    for path in directory.glob(f"{glob.escape(name)}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            found.append(path)
    return found


@dataclass(frozen=True)
class Entry:
    """One cached stage result."""

    root: Path
    parts: dict[str, Any]

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def lock_file(self) -> Path:
        return self.root.with_name(f"{self.root.name}.lock")

    def done(self) -> bool:
        return (self.root / STAMP).is_file()

    def stamp_id(self) -> tuple[int, int] | None:
        """Which completion this is (a rebuilt entry has a new stamp file), None when not done."""
        try:
            st = (self.root / STAMP).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns


def entry(cache_dir: Path, stage: str, arch: str, parts: dict[str, Any]) -> Entry:
    return Entry(cache_dir / stage / arch / key(parts), parts)


@contextlib.contextmanager
def building(item: Entry) -> Iterator[Path]:
    """Yield an empty work dir; on success it becomes the entry, on any failure it is deleted.
    The caller holds the entry's lock (exclusive(item.lock_file)), as cached() does."""
    item.root.parent.mkdir(parents=True, exist_ok=True)
    work = item.root.with_name(f"{item.root.name}.partial-{os.getpid()}")
    # Under the lock no other build writes this entry; a live pid's partial is still left
    # alone (a build of an older CaptainOS takes no lock). Ours is from a process that had our pid.
    for stale in [*stale_partials(item.root.parent, item.root.name), *([work] if work.exists() else [])]:
        log.debug(f"removing interrupted build {stale}")
        discard(stale)
    work.mkdir()
    try:
        yield work
        (work / STAMP).write_text(json.dumps(item.parts, sort_keys=True, indent=1, default=str))
        if item.root.exists():
            shutil.rmtree(item.root)
        os.rename(work, item.root)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def record_last(cache_dir: Path, stage: str, arch: str, item: Entry) -> None:
    """Remember the newest complete entry, for stages run with mode `skip` later."""
    atomic_write(cache_dir / stage / arch / "last", item.key + "\n")


def last(cache_dir: Path, stage: str, arch: str) -> Entry:
    """The newest complete entry of a stage, or a clear error when there is none."""
    pointer = cache_dir / stage / arch / "last"
    if pointer.is_file():
        root = pointer.parent / pointer.read_text().strip()
        found = Entry(root, {})
        if found.done():
            return found
    raise CaptainError(f"the {stage} stage is skipped but no earlier {stage} build for {arch} exists",
                       f"run './build.py {stage}' once first")


def cached(cache_dir: Path, stage: str, arch: str, parts: dict[str, Any], *, force: bool,
           produce: Callable[[Path], None]) -> Path:
    """Return the entry directory for these inputs, producing it (atomically) when missing.

    produce(work) fills the work directory; it becomes the entry only if it returns.
    """
    item = entry(cache_dir, stage, arch, parts)
    if item.done() and not force:
        log.info(f"    cached: {stage} {item.key} ({item.root})")
    else:
        before = item.stamp_id()
        item.root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(item.lock_file):
            if item.done() and (not force or item.stamp_id() != before):
                # Another build produced it while this one waited for the lock.
                log.info(f"    cached: {stage} {item.key} ({item.root}, built meanwhile by another build)")
            else:
                with building(item) as work:
                    produce(work)
    record_last(cache_dir, stage, arch, item)
    return item.root


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on lock_file; another holder makes this wait, with a message."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"    waiting for another build holding {lock_file}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_text_from(path: Path, offset: int = 0) -> str:
    """A log's text from byte offset on ("" when the file is not there yet)."""
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")
