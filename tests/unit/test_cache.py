import hashlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from captainos.core import cache
from captainos.core.errors import CaptainError
from captainos.sources import fetch

REPO = Path(__file__).resolve().parents[2]


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
    assert [p.name for p in stage_dir.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(CaptainError, match="no earlier demo build"):
        cache.last(tmp_path, "demo", "amd64")


def test_killed_build_is_not_mistaken_for_done(tmp_path):
    """SIGKILL in the middle of produce(): the next run rebuilds and cleans the leftovers."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from captainos.core import cache
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


# --- two builds sharing one cache ----------------------------------------------------------

_PRODUCER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from captainos.core import cache
    root = Path(sys.argv[1])
    def produce(work):
        with (root / "produced").open("a") as log:
            log.write(f"{os.getpid()}\\n")
        (work / "out").write_text("half")
        deadline = time.monotonic() + 60
        while not (root / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (work / "out").write_text("whole")
    entry = cache.cached(root / "cache", "demo", "amd64", {"v": 1}, force=False, produce=produce)
    print((entry / "out").read_text())
""")


def _producer(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _PRODUCER, str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stderr_until(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> str:
    """proc's stderr up to the first line containing text (fails after timeout)."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stderr.readline() if ready else ""
        assert line, f"no {text!r} on stderr within {timeout:.0f}s; got: {seen!r}"
        seen += line
    return seen


def test_two_processes_building_one_key_both_succeed_and_produce_it_once(tmp_path):
    first = _producer(tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "produced").exists():  # the first one is inside produce() ...
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _producer(tmp_path)  # ... when the second one asks for the same entry
    try:
        waited = _stderr_until(second, "waiting for another build")
    finally:
        (tmp_path / "release").touch()  # the first one finishes its entry
    results = [(*proc.communicate(timeout=60), proc.returncode) for proc in (first, second)]
    for out, err, code in results:
        assert code == 0, err
        assert out.strip() == "whole"
    assert (tmp_path / "produced").read_text().splitlines() == [str(first.pid)]
    item = cache.entry(tmp_path / "cache", "demo", "amd64", {"v": 1})
    assert item.done() and (item.root / "out").read_text() == "whole"
    assert not list(item.root.parent.glob("*.partial-*"))
    assert "built meanwhile by another build" in waited + results[1][1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_only_partials_of_dead_builds_are_removed(tmp_path, live_pid):
    item = cache.entry(tmp_path, "demo", "amd64", {"v": 1})
    item.root.parent.mkdir(parents=True)
    dead = item.root.with_name(f"{item.key}.partial-{_dead_pid()}")
    live = item.root.with_name(f"{item.key}.partial-{live_pid}")
    for path in (dead, live):
        path.mkdir()
        (path / "half").write_text("partial")
    cache.cached(tmp_path, "demo", "amd64", {"v": 1}, force=False, produce=lambda work: (work / "ok").write_text(""))
    assert item.done()
    assert not dead.exists()
    assert (live / "half").read_text() == "partial"  # another build is still writing there


def test_a_killed_downloads_leftover_is_removed_a_running_ones_kept(http_root, tmp_path, live_pid):
    root, url = http_root
    (root / "file").write_bytes(b"data")
    dest = tmp_path / "downloads" / "file"
    dest.parent.mkdir()
    dead = dest.with_name(f".file.partial-{_dead_pid()}")
    live = dest.with_name(f".file.partial-{live_pid}")
    dead.write_bytes(b"da")
    live.write_bytes(b"d")
    fetch.download(f"{url}/file", dest, hashlib.sha256(b"data").hexdigest())
    assert dest.read_bytes() == b"data"
    assert not dead.exists() and live.read_bytes() == b"d"


def test_atomic_write_from_many_threads_of_one_process(tmp_path):
    """Two threads writing one file (two VMs started side by side record the same stage's
    `last` pointer) must not share a temp name: one would rename the other's away."""
    from concurrent.futures import ThreadPoolExecutor

    from captainos.core import cache

    target = tmp_path / "last"

    def write(n: int) -> None:
        for _ in range(200):
            cache.atomic_write(target, f"{n}\n")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(4)))  # raises if a rename lost its temp file
    assert target.read_text() in {f"{n}\n" for n in range(4)}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_code_digest_ignores_comments_docstrings_and_layout_but_not_code(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text('"""What it does."""\n\ndef build(x):\n    """Build."""\n    return x + 1  # one more\n')
    first = cache.code_digest(module)
    module.write_text('"""What it does,\nsaid better."""\n\n\ndef build(x):\n    # a new comment\n'
                      '    return x + 1\n')
    assert cache.code_digest(module) == first
    module.write_text('"""What it does."""\n\ndef build(x):\n    return x + 2\n')
    assert cache.code_digest(module) != first


def test_one_force_rule_for_every_stage():
    from captainos.core import config
    from captainos.stages import pipeline

    plain = config.load(env={}, stages=pipeline.options())
    assert not any(plain.force(s) for s in ("kernel", "tools", "initramfs", "iso", "publish"))
    kernel = config.load(env={"FORCE_KERNEL": "1"}, stages=pipeline.options())
    assert kernel.force("kernel") and not kernel.force("tools") and not kernel.force("iso")
    assert config.load(env={"FORCE_TOOLS": "1"}, stages=pipeline.options()).force("tools")
    everything = config.load(env={"NO_CACHE": "1"})
    assert all(everything.force(s) for s in ("kernel", "tools", "initramfs", "iso", "publish"))
