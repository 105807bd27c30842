"""image.py: the mkosi command line, input checks, cache keys and the stage contract."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from captainos import __version__
from captainos.core import pins
from captainos.core.config import REPO, Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import mkosi
from captainos.stages import cpio, image

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def argv(arch: Arch = Arch.AMD64, **kwargs) -> list[str]:
    defaults = {"output_dir": Path("/o"), "cache_dir": Path("/c"), "extra_trees": [Path("/m"), Path("/t")],
                "profiles": (), "version": "9.9.9"}
    return image.mkosi_argv(arch, **{**defaults, **kwargs})


def test_mkosi_argv_amd64():
    cmd = argv()
    assert cmd[:5] == ["env", f"PYTHONPATH={mkosi.pythonpath()}", "python3", "-m", "mkosi"]
    assert cmd[5:7] == ["-C", str(image.IMAGE_DIR)]
    assert "--architecture=x86-64" in cmd
    assert "--output-dir=/o" in cmd
    assert "--cache-directory=/c/incremental/default" in cmd and "--package-cache-directory=/c/packages" in cmd
    assert "--incremental=yes" in cmd
    assert "--image-version=9.9.9" in cmd
    assert [a for a in cmd if a.startswith("--extra-tree=")] == ["--extra-tree=/m", "--extra-tree=/t"]
    assert cmd[-2:] == ["-f", "build"]
    assert not any(a.startswith("--profile") for a in cmd)


def test_mkosi_argv_arm64_profiles_and_cache_rebuild():
    cmd = argv(Arch.ARM64, profiles=("test",), rebuild_caches=True)
    assert "--architecture=arm64" in cmd
    assert "--profile=test" in cmd
    assert cmd[-2:] == ["-ff", "build"]


def test_each_profile_set_has_its_own_incremental_cache():
    """mkosi names its cache by distribution and architecture only: alternating profiles must
    not evict each other's."""
    assert "--cache-directory=/c/incremental/test" in argv(profiles=("test",))
    assert "--cache-directory=/c/incremental/ssh+test" in argv(profiles=("test", "ssh"))
    assert "--cache-directory=/c/incremental/ssh+test" in argv(profiles=("ssh", "test"))


def test_mkosi_pythonpath_is_the_pinned_unpacked_package():
    expected = REPO / ".tools" / f"mkosi-{pins.MKOSI.version}" / "usr/lib/python3/dist-packages"
    assert mkosi.pythonpath() == expected


def test_summary_argv():
    cmd = image.summary_argv(Config(arch=Arch.ARM64, profiles=("test",)))
    assert cmd[-1] == "summary"
    assert "--architecture=arm64" in cmd and "--profile=test" in cmd
    assert f"--image-version={__version__}" in cmd


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(CaptainError) as err:
        image.check_profiles(("tset",))
    assert "tset" in err.value.message and "test" in (err.value.hint or "")
    image.check_profiles(("test",))


def test_ca_certs_must_exist_and_be_pem(tmp_path):
    with pytest.raises(CaptainError, match="does not exist") as missing:
        image.check_ca_certs((tmp_path / "missing.pem",))
    assert "./build.py lab ca" in str(missing.value.hint)  # the README's first lab command names this file
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01")
    with pytest.raises(CaptainError, match="not a PEM certificate"):
        image.check_ca_certs((der,))
    pem = tmp_path / "ca.pem"
    pem.write_bytes(PEM)
    image.check_ca_certs((pem,))


def test_ca_certs_are_staged_as_crt_files(tmp_path):
    first, second = tmp_path / "a.pem", tmp_path / "b.crt"
    first.write_bytes(PEM)
    second.write_bytes(PEM)
    image.stage_ca_tree((first, second), tmp_path / "tree")
    staged = sorted(p.name for p in (tmp_path / "tree" / image.CA_DIR).iterdir())
    assert staged == ["captainos-extra-0-a.crt", "captainos-extra-1-b.crt"]


@pytest.fixture
def entries(tmp_path):
    kernel = tmp_path / "kernel" / "k1"
    (kernel / "modules/usr/lib/modules/6.12.0").mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({"version": "6.12.0"}))
    (kernel / "config").write_text("CONFIG_TMPFS=y\n")
    tools = tmp_path / "tools" / "t1"
    (tools / "tree/usr/bin").mkdir(parents=True)
    (tools / "tree/usr/bin/containerd").write_text("containerd-binary")
    (tools / "tree/usr/bin/containerd").chmod(0o755)
    (tools / "tree/usr/bin/ctr").write_text("ctr-binary")
    (tools / "tree/usr/bin/ctr").chmod(0o755)
    return kernel, tools


def test_inputs_change_with_every_input(tmp_path, entries):
    kernel, tools = entries
    pem = tmp_path / "ca.pem"
    pem.write_bytes(PEM)
    base = image.inputs(Config(), kernel, tools)
    assert base["version"] == __version__ and base["kernel"] == "k1" and base["tools"] == "t1"
    variants = [image.inputs(Config(profiles=("test",)), kernel, tools),
                image.inputs(Config(extra_ca_certs=(pem,)), kernel, tools),
                image.inputs(Config(arch=Arch.ARM64), kernel, tools),
                image.inputs(Config(), kernel.with_name("k2"), tools),
                image.inputs(Config(), kernel, tools.with_name("t2")),
                image.inputs(Config(), kernel, tools, tmp_path / "firmware" / "f1")]
    assert all(v != base for v in variants)


class FakeMkosi(Runner):
    """Records the argv and writes what mkosi would write (or fails); runs zstd for real."""

    def __init__(self, fail: bool = False) -> None:
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "fail", fail)

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def,override]
        if argv[0] == "zstd":
            return subprocess.run(argv, check=True)
        self.calls.append(list(argv))
        out = Path(next(a for a in argv if a.startswith("--output-dir=")).split("=", 1)[1])
        for tree in (a.split("=", 1)[1] for a in argv if a.startswith("--extra-tree=")):
            assert Path(tree).is_dir(), tree
        kwargs["log_file"].write_text("mkosi log\n")
        if self.fail:
            raise CaptainError("command failed with exit code 1: mkosi")
        root = [("etc", 0o40755, b""), ("etc/os-release", 0o100644, b"ID=x\n")]
        (out / "initramfs.cpio").write_bytes(cpio.write(root))
        return subprocess.CompletedProcess(argv, 0)


def test_build_produces_an_entry_and_reuses_it(tmp_path, entries, monkeypatch):
    kernel, tools = entries
    monkeypatch.setattr(Config, "build_dir", property(lambda self: tmp_path / "build"))
    cfg = Config(cache_dir=tmp_path / "cache", profiles=("test",))
    fake = FakeMkosi()
    entry = image.build(cfg, fake, kernel, tools)
    built = entry / "initramfs.cpio.zst"
    assert built.read_bytes().startswith(b"\x28\xb5\x2f\xfd")
    # Two archives, the OS then the tools, each its own zstd frame; together one root.
    members = {m.name: m for m in cpio.members(cpio.decompress(built))}
    assert members["etc/os-release"].data == b"ID=x\n"
    assert members["usr/bin/containerd"].data == b"containerd-binary"
    assert members["usr/bin/containerd"].mode == 0o100755
    assert members["usr/bin/containerd"].mtime == pins.SOURCE_DATE_EPOCH
    meta = json.loads((entry / "image.json").read_text())
    assert meta["kernel"] == "6.12.0" and meta["size"] == built.stat().st_size
    assert meta["segments"]["os"] + meta["segments"]["tools"] + meta["segments"]["sbom"] == meta["size"]
    assert sorted(p.name for p in entry.iterdir()) == [".captainos-complete.json", "image.json", "initramfs.cpio.zst",
                                                       "packages.lock", "sbom.spdx.json"]
    # The SBOM rides in the image too (a third segment), and lists what the fake mkosi made.
    assert members["usr/share/captainos/sbom.spdx.json"].data == (entry / "sbom.spdx.json").read_bytes()
    assert json.loads((entry / "sbom.spdx.json").read_text())["spdxVersion"] == "SPDX-2.3"
    trees = [a for a in fake.calls[0] if a.startswith("--extra-tree=")]
    assert trees[0].endswith("k1/modules") and "/firmware/amd64/" in trees[1] and len(trees) == 3
    assert not any(t.endswith("t1/tree") for t in trees)  # the tools come as their own segment
    assert f"--source-date-epoch={pins.SOURCE_DATE_EPOCH}" in fake.calls[0]
    assert "--profile=test" in fake.calls[0]
    assert image.build(cfg, fake, kernel, tools) == entry
    assert len(fake.calls) == 1  # cache hit: mkosi not run again


def test_failed_mkosi_leaves_no_entry_but_keeps_its_log(tmp_path, entries, monkeypatch):
    kernel, tools = entries
    monkeypatch.setattr(Config, "build_dir", property(lambda self: tmp_path / "build"))
    cfg = Config(cache_dir=tmp_path / "cache")
    with pytest.raises(CaptainError):
        image.build(cfg, FakeMkosi(fail=True), kernel, tools)
    assert not list((tmp_path / "cache" / "initramfs" / "amd64").glob("*/initramfs.cpio.zst"))
    assert (tmp_path / "build" / "mkosi.log").read_text() == "mkosi log\n"


def test_entries_without_modules_or_tools_are_refused(tmp_path, entries):
    kernel, tools = entries
    with pytest.raises(CaptainError, match="no modules"):
        image.build(Config(cache_dir=tmp_path), FakeMkosi(), tmp_path / "nokernel", tools)
    with pytest.raises(CaptainError, match="containerd"):
        image.build(Config(cache_dir=tmp_path), FakeMkosi(), kernel, tmp_path / "notools")


def test_only_the_test_profile_gets_the_tools_the_shipped_image_leaves_out(tmp_path, entries):
    kernel, tools = entries
    image.stage_captainos_tree(Config(), kernel, tools, tmp_path / "shipped")
    image.stage_captainos_tree(Config(profiles=("test",)), kernel, tools, tmp_path / "test")
    assert not (tmp_path / "shipped/usr/bin/ctr").exists()
    assert (tmp_path / "test/usr/bin/ctr").read_text() == "ctr-binary"
    assert (tmp_path / "test/usr/bin/ctr").stat().st_mode & 0o777 == 0o755
