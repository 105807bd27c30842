"""segments.py and cpio.write_tree: the tools archive, its compression and the concatenation."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from captainos.core import pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.stages import cpio, segments


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "usr/bin").mkdir(parents=True)
    (root / "opt/cni/bin").mkdir(parents=True)
    for rel, data, mode in [("usr/bin/runc", b"runc", 0o755), ("usr/bin/ctr", b"ctr", 0o755),
                            ("opt/cni/bin/bridge", b"bridge", 0o755), ("usr/bin/notes", b"n", 0o644)]:
        (root / rel).write_bytes(data)
        (root / rel).chmod(mode)
    os.symlink("runc", root / "usr/bin/runc-link")
    return root


def test_write_tree_orders_dirs_first_then_the_named_leaders(tmp_path):
    out = io.BytesIO()
    names = cpio.write_tree(tree(tmp_path), out, mtime=1234, first=("usr/bin/runc", "usr/bin/absent"))
    assert names == ["opt", "opt/cni", "opt/cni/bin", "usr", "usr/bin", "usr/bin/runc", "opt/cni/bin/bridge",
                     "usr/bin/ctr", "usr/bin/notes", "usr/bin/runc-link"]
    members = {m.name: m for m in cpio.members(out.getvalue())}
    assert list(members) == names
    assert members["usr/bin/runc"].mode == 0o100755 and members["usr/bin/notes"].mode == 0o100644
    assert members["usr/bin/runc-link"].mode == 0o120777 and members["usr/bin/runc-link"].data == b"runc"
    assert members["usr"].mode == 0o40755
    assert {m.mtime for m in members.values()} == {1234}


def test_write_tree_leaves_out_what_it_is_told(tmp_path):
    out = io.BytesIO()
    names = cpio.write_tree(tree(tmp_path), out, mtime=1, leave_out=("usr/bin/ctr", "usr/bin/absent"))
    assert "usr/bin/ctr" not in names and "usr/bin/runc" in names
    assert [m.name for m in cpio.members(out.getvalue())] == names


def test_write_tree_is_deterministic(tmp_path):
    root = tree(tmp_path)
    first, second = io.BytesIO(), io.BytesIO()
    cpio.write_tree(root, first, mtime=5)
    os.utime(root / "usr/bin/ctr", (1, 1))  # the tree's own times never show
    cpio.write_tree(root, second, mtime=5)
    assert first.getvalue() == second.getvalue()


def test_write_tree_refuses_special_files(tmp_path):
    root = tree(tmp_path)
    os.mkfifo(root / "usr/bin/fifo")
    with pytest.raises(CaptainError, match="not a file, directory or symlink"):
        cpio.write_tree(root, io.BytesIO(), mtime=0)


def test_tools_leaders_are_tools_the_stage_ships():
    shipped = {f"{pin.dest}/{binary}".lstrip("/") for pin in pins.TOOLS for binary in pin.binaries}
    assert set(segments.TOOLS_FIRST) <= shipped


def test_zstd_argv_uses_all_cores_and_the_long_window():
    argv = segments.zstd_argv(segments.OS_ZSTD, Path("/a"), Path("/b"))
    assert argv == ["zstd", "-q", "-T0", "-19", "--long=26", "-f", "-o", "/b", "/a"]
    assert "--long=26" in segments.TOOLS_ZSTD and "--zstd=wlog=26" in segments.TOOLS_ZSTD


class Counting(Runner):
    def __init__(self) -> None:
        object.__setattr__(self, "calls", [])

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def,override]
        self.calls.append(list(argv))
        return subprocess.run(argv, check=True)


def test_tools_segment_is_cached_by_the_tools_entry(tmp_path):
    entry = tmp_path / "tools" / "t1"
    (entry / "tree").parent.mkdir(parents=True)
    tree(tmp_path).rename(entry / "tree")
    cfg, runner = Config(cache_dir=tmp_path / "cache"), Counting()
    segment = segments.tools_segment(cfg, runner, entry)
    assert segments.tools_segment(cfg, runner, entry) == segment
    assert len(runner.calls) == 1
    members = {m.name: m for m in cpio.members(cpio.decompress(segment))}
    assert members["usr/bin/runc"].data == b"runc" and members["usr/bin/runc"].mtime == pins.SOURCE_DATE_EPOCH
    assert "usr/bin/ctr" not in members  # built by the tools stage, not shipped (TOOLS_LEFT_OUT)
    assert not list(segment.parent.glob("*.cpio"))  # the uncompressed archive is gone


def test_concatenated_segments_decompress_as_one_stream(tmp_path):
    parts = []
    for name in ("a", "b"):
        raw = tmp_path / f"{name}.cpio"
        raw.write_bytes(cpio.write([(name, 0o100644, name.encode() * 3)]))
        segments.compress(Runner(), ("-3",), raw, tmp_path / f"{name}.zst")
        assert not raw.exists()
        parts.append(tmp_path / f"{name}.zst")
    segments.concatenate(parts, tmp_path / "all.zst")
    assert [m.data for m in cpio.members(cpio.decompress(tmp_path / "all.zst"))] == [b"aaa", b"bbb"]
    assert not (tmp_path / "all.zst.part").exists()


def _zstd(data: bytes, *options: str) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", *options], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("options", [(), ("--no-check",), ("-19", "--long=26", "-T2"), ("--no-content-size",)])
def test_frames_split_concatenated_segments(options):
    first, second = _zstd(b"one" * 40000, *options), _zstd(bytes(range(256)) * 4000, *options)
    assert segments.frames(first + second) == [first, second]


def test_frames_skip_skippable_frames_and_refuse_garbage_or_truncation():
    frame = _zstd(b"payload" * 1000)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    assert segments.frames(skippable + frame) == [frame]
    with pytest.raises(CaptainError, match="no zstd frame at byte 0"):
        segments.frames(b"\x00" * 16)
    for cut in (3, len(frame) // 2, len(frame) - 8):
        with pytest.raises(CaptainError, match="truncated"):
            segments.frames(frame[:-cut])
