import os
import signal
import subprocess
import sys
import textwrap

import pytest

from captainos import cache
from captainos.errors import CaptainError


def test_key_is_stable_and_changes_with_any_input():
    parts = {"version": "2.2.1", "sha256": "ab" * 32, "arch": "amd64"}
    assert cache.key(parts) == cache.key(dict(reversed(parts.items())))
    assert cache.key(parts) != cache.key({**parts, "version": "2.2.2"})
    assert cache.key(parts) != cache.key({**parts, "arch": "arm64"})


def test_hash_tree_sees_content_mode_and_names(tmp_path):
    (tmp_path / "a").write_text("x")
    first = cache.hash_tree(tmp_path)
    (tmp_path / "a").write_text("y")
    second = cache.hash_tree(tmp_path)
    os.chmod(tmp_path / "a", 0o755)
    third = cache.hash_tree(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    fourth = cache.hash_tree(tmp_path)
    assert len({first, second, third, fourth}) == 4


def test_cached_produces_once_then_hits(tmp_path):
    calls = []

    def produce(work):
        calls.append(work)
        (work / "out").write_text("built")

    first = cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=False, produce=produce)
    second = cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=False, produce=produce)
    assert first == second and len(calls) == 1
    assert (first / "out").read_text() == "built"
    cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=True, produce=produce)
    assert len(calls) == 2
    bumped = cache.cached(tmp_path, "demo", "amd64", {"v": 2}, force=False, produce=produce)
    assert bumped != first and len(calls) == 3
    assert cache.last(tmp_path, "demo", "amd64").root == bumped


def test_failed_produce_leaves_nothing(tmp_path):
    def produce(work):
        (work / "half").write_text("partial")
        raise CaptainError("compile failed")

    with pytest.raises(CaptainError):
        cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=False, produce=produce)
    stage_dir = tmp_path / "demo" / "amd64"
    assert [p.name for p in stage_dir.iterdir()] == []
    with pytest.raises(CaptainError, match="no earlier demo build"):
        cache.last(tmp_path, "demo", "amd64")


def test_killed_build_is_not_mistaken_for_done(tmp_path):
    """SIGKILL in the middle of produce(): the next run rebuilds and cleans the leftovers."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from captainos import cache
        def produce(work):
            (work / "half").write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
        cache.cached(Path({str(tmp_path)!r}), "demo", "amd64", {{"v": 1}}, force=False, produce=produce)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), check=False)
    assert proc.returncode == -signal.SIGKILL
    item = cache.entry(tmp_path, "demo", "amd64", {"v": 1})
    assert not item.done()
    assert list(item.root.parent.glob("*.partial-*"))  # the leftover exists ...
    built = cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=False,
                         produce=lambda work: (work / "ok").write_text("ok"))
    assert (built / "ok").exists() and not (built / "half").exists()
    assert not list(item.root.parent.glob("*.partial-*"))  # ... and is gone after the rebuild


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f"
    cache.atomic_write(target, "one")
    cache.atomic_write(target, b"two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f"]


def test_atomic_copy_keeps_mode(tmp_path):
    src = tmp_path / "bin"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o755)
    cache.atomic_copy(src, tmp_path / "out" / "bin")
    assert os.access(tmp_path / "out" / "bin", os.X_OK)


def test_exclusive_serializes_holders(tmp_path):
    import threading
    import time

    order = []
    lock = tmp_path / "dir" / ".lock"

    def second():
        with cache.exclusive(lock):
            order.append("second")

    with cache.exclusive(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]
