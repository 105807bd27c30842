"""tools stage and fetch helpers: downloads and archives against a local HTTP server, source
choice, cache keys, ELF and version checks. No network beyond 127.0.0.1."""

import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from captainos.core import cache, config, pins
from captainos.core.config import Arch, ToolsSource
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import fetch, golang
from captainos.stages import tools

# --- fixtures ------------------------------------------------------------------------------


class Server:
    """Serves `files` (path -> bytes) on 127.0.0.1; paths in `short` advertise more bytes than sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.send_response(200 if self.path in owner.files else 404)
                self.end_headers()

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in owner.short else body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as srv:
        yield srv


def closed_port_url() -> str:
    """A 127.0.0.1 URL nothing listens on (the port was bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None, mode: int = 0o755) -> bytes:
    """A gzip tar with regular files (name -> content) and symlinks (name -> target); the same
    members give the same bytes (gzip's timestamp is fixed)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_elf(machine: int) -> bytes:
    """Just enough of a 64-bit little-endian ELF header for the e_machine check."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    header[18:20] = machine.to_bytes(2, "little")
    return bytes(header)


def cfg_for(tmp_path: Path, **flags: str) -> config.Config:
    return config.load(env={}, flags={"cache_dir": str(tmp_path / "cache"), **flags})


CONTAINERD = next(p for p in pins.TOOLS if p.name == "containerd")
RUNC = next(p for p in pins.TOOLS if p.name == "runc")
NERDCTL = next(p for p in pins.TOOLS if p.name == "nerdctl")
# The table with runc's release digest filled in: its release key then needs no network.
PINNED = tuple(dataclasses.replace(p, sha256={"amd64": "3" * 64, "arm64": "4" * 64}) if p is RUNC else p
               for p in pins.TOOLS)


def containerd_archive(**missing: bool) -> bytes:
    names = ["containerd", "ctr", "containerd-shim-runc-v2", "containerd-stress"]
    return make_tar({f"bin/{n}": fake_elf(62) for n in names if not missing.get(n.replace("-", "_"))})


def pin_serving(pin: pins.ToolPin, server: Server, data: bytes, arch: Arch = Arch.AMD64) -> pins.ToolPin:
    """The pin with its digest set to data's, data served at the pin's release path."""
    server.files["/" + pin.release_path(arch.value)] = data
    return dataclasses.replace(pin, sha256={**pin.sha256, arch.value: sha(data)})


# --- URLs ----------------------------------------------------------------------------------


def test_release_url_per_arch_from_the_upstream_host(tmp_path):
    for arch, name in ((Arch.AMD64, "containerd-2.2.1-linux-amd64.tar.gz"),
                       (Arch.ARM64, "containerd-2.2.1-linux-arm64.tar.gz")):
        cfg = cfg_for(tmp_path, arch=arch.value)
        assert tools.release_url(cfg, CONTAINERD) == (
            f"https://github.com/containerd/containerd/releases/download/v2.2.1/{name}")
    assert tools.release_url(cfg_for(tmp_path, arch="arm64"), RUNC) == (
        "https://github.com/opencontainers/runc/releases/download/v1.4.0/runc.arm64")


def test_mirror_replaces_the_release_host(tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror="https://mirror.example/gh/")
    assert tools.release_url(cfg, NERDCTL) == (
        "https://mirror.example/gh/containerd/nerdctl/releases/download/v2.2.1/nerdctl-2.2.1-linux-amd64.tar.gz")


def test_unknown_arch_is_one_clear_error(tmp_path):
    with pytest.raises(CaptainError, match="invalid ARCH 'riscv64'"):
        config.load(env={"ARCH": "riscv64"})
    amd64_only = dataclasses.replace(CONTAINERD, sha256={"amd64": CONTAINERD.sha256["amd64"]})
    with pytest.raises(CaptainError, match="has no release for arm64"):
        tools.release_digest(amd64_only, Arch.ARM64)


# --- fetch: download and verify ------------------------------------------------------------


def test_download_verifies_then_renames_into_place(server, tmp_path):
    server.files["/f.tar.gz"] = data = containerd_archive()
    dest = fetch.download(f"{server.url}/f.tar.gz", tmp_path / "dl" / "f.tar.gz", sha(data))
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["f.tar.gz"]
    fetch.download(f"{server.url}/f.tar.gz", dest, sha(data))
    assert server.requests == ["/f.tar.gz"], "a verified file is reused without downloading again"


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    good = containerd_archive()
    server.files["/f.tar.gz"] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(CaptainError, match=f"sha256 mismatch for .*/f.tar.gz: expected {sha(good)}"):
        fetch.download(f"{server.url}/f.tar.gz", tmp_path / "f.tar.gz", sha(good))
    assert list(tmp_path.iterdir()) == []


def test_a_cached_file_with_the_wrong_digest_is_replaced(server, tmp_path):
    server.files["/f"] = b"right"
    (tmp_path / "f").write_bytes(b"wrong")
    fetch.download(f"{server.url}/f", tmp_path / "f", sha(b"right"))
    assert (tmp_path / "f").read_bytes() == b"right"


def test_truncated_download_is_refused(server, tmp_path):
    server.files["/f.tar.gz"] = data = containerd_archive() * 4
    server.short.add("/f.tar.gz")
    with pytest.raises(CaptainError, match=rf"truncated: got {len(data) // 2} of {len(data)} bytes"):
        fetch.download(f"{server.url}/f.tar.gz", tmp_path / "f.tar.gz", sha(data))
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unreachable_host_are_one_line_each(server, tmp_path):
    with pytest.raises(CaptainError, match="HTTP 404"):
        fetch.download(f"{server.url}/missing", tmp_path / "x", "0" * 64)
    with pytest.raises(CaptainError, match=r"cannot download http://127\.0\.0\.1:[0-9]+/x: .*refused"):
        fetch.download(f"{closed_port_url()}/x", tmp_path / "x", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_probe_tells_answering_from_silent_hosts(server):
    assert fetch.probe(server.url) is None
    assert fetch.probe(f"{server.url}/not-there") is None, "a 404 is still an answer"
    assert "refused" in (fetch.probe(closed_port_url(), timeout=2) or "")


# --- fetch: safe extraction ----------------------------------------------------------------


def extract(tmp_path: Path, data: bytes, keep=None) -> list[str]:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(data)
    return fetch.safe_extract(archive, tmp_path / "out", keep)


def test_extract_keeps_selected_regular_files_with_their_mode(tmp_path):
    names = extract(tmp_path, containerd_archive(), keep=lambda n: n != "bin/containerd-stress")
    assert sorted(names) == ["bin/containerd", "bin/containerd-shim-runc-v2", "bin/ctr"]
    assert (tmp_path / "out/bin/ctr").stat().st_mode & 0o777 == 0o755
    assert not (tmp_path / "out/bin/containerd-stress").exists()


@pytest.mark.parametrize(("members", "links", "message"), [
    ({"../evil": b"x"}, None, "unsafe path '../evil'"),
    ({"bin/../../evil": b"x"}, None, "unsafe path"),
    ({"/etc/evil": b"x"}, None, "unsafe path '/etc/evil'"),
    ({"bin/ctr": b"x"}, {"bin/link": "../../etc/passwd"}, "symlink 'bin/link' .* points outside"),
    ({"bin/ctr": b"x"}, {"bin/abs": "/etc/passwd"}, "symlink 'bin/abs' .* points outside"),
])
def test_unsafe_archives_are_refused_whole(tmp_path, members, links, message):
    with pytest.raises(CaptainError, match=message):
        extract(tmp_path, make_tar(members, links))
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


def test_a_selected_link_is_not_created(tmp_path):
    with pytest.raises(CaptainError, match="is a link"):
        extract(tmp_path, make_tar({"bin/real": b"x"}, {"bin/ctr": "real"}))


def test_corrupt_archive_is_one_clear_error(tmp_path):
    with pytest.raises(CaptainError, match=r"cannot extract .*corrupt or truncated"):
        data = containerd_archive()
        extract(tmp_path, data[: len(data) // 2])


# --- the release source ---------------------------------------------------------------------


def test_release_source_downloads_verifies_and_keeps_the_listed_binaries(server, tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    pin = pin_serving(CONTAINERD, server, containerd_archive())
    bin_dir = tmp_path / "work" / "bin"
    bin_dir.mkdir(parents=True)
    origin = tools.from_release(cfg, pin, bin_dir)
    assert sorted(p.name for p in bin_dir.iterdir()) == ["containerd", "containerd-shim-runc-v2", "ctr"]
    assert origin == {"url": tools.release_url(cfg, pin), "sha256": pin.sha256["amd64"]}
    assert not (tmp_path / "work" / "unpacked").exists()


def test_release_missing_a_listed_binary_is_refused(server, tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    pin = pin_serving(CONTAINERD, server, containerd_archive(ctr=True))
    (tmp_path / "bin").mkdir()
    with pytest.raises(CaptainError, match=re.escape("containerd-2.2.1-linux-amd64.tar.gz has no ctr")):
        tools.from_release(cfg, pin, tmp_path / "bin")


def test_release_tampered_archive_never_reaches_the_work_dir(server, tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    pin = pin_serving(CONTAINERD, server, containerd_archive())
    server.files["/" + pin.release_path("amd64")] = containerd_archive(containerd_stress=True)
    (tmp_path / "bin").mkdir()
    with pytest.raises(CaptainError, match="sha256 mismatch"):
        tools.from_release(cfg, pin, tmp_path / "bin")
    assert list((tmp_path / "bin").iterdir()) == []
    assert not (tmp_path / "cache" / "downloads" / "tools" / "containerd-2.2.1-linux-amd64.tar.gz").exists()


def test_release_traversal_archive_with_a_matching_pin_is_still_refused(server, tmp_path):
    # The digest matches (a compromised pin or mirror): extraction itself must refuse it.
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    evil = make_tar({"bin/containerd": fake_elf(62), "bin/../../../evil": b"x"},
                    {"bin/ctr": "../../../../etc/passwd"})
    pin = pin_serving(CONTAINERD, server, evil)
    (tmp_path / "work" / "bin").mkdir(parents=True)
    with pytest.raises(CaptainError, match=re.escape("unsafe path 'bin/../../../evil'")):
        tools.from_release(cfg, pin, tmp_path / "work" / "bin")
    assert server.requests == ["/" + pin.release_path("amd64")]
    assert [p for p in (tmp_path / "work").rglob("*") if not p.is_dir()] == []  # nothing extracted
    assert not (tmp_path / "evil").exists()


def test_release_of_a_bare_binary_is_copied_as_is(server, tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    pin = pin_serving(RUNC, server, fake_elf(62))
    (tmp_path / "bin").mkdir()
    tools.from_release(cfg, pin, tmp_path / "bin")
    assert (tmp_path / "bin" / "runc").read_bytes() == fake_elf(62)


UNPINNED_RUNC = dataclasses.replace(RUNC, sha256={"amd64": None, "arm64": None})
RUNC_SUMS = "/opencontainers/runc/releases/download/v1.4.0/runc.sha256sum"


def test_a_digest_listed_beside_the_file_is_never_trusted(server, tmp_path):
    # The release host (or a mirror) serving both the file and its digest proves nothing.
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    binary = fake_elf(62)
    server.files["/" + RUNC.release_path("amd64")] = binary
    server.files[RUNC_SUMS] = f"{sha(binary)}  runc.amd64\n".encode()
    (tmp_path / "bin").mkdir()
    with pytest.raises(CaptainError) as err:
        tools.from_release(cfg, UNPINNED_RUNC, tmp_path / "bin")
    assert str(err.value) == "no pinned sha256 for runc 1.4.0 (amd64); use --tools-source go"
    assert server.requests == [] and list((tmp_path / "bin").iterdir()) == []


def test_a_plain_http_mirror_gets_no_request_for_an_unpinned_file(server, tmp_path, monkeypatch):
    binary = fake_elf(62)
    server.files["/" + RUNC.release_path("amd64")] = binary
    server.files[RUNC_SUMS] = f"{sha(binary)}  runc.amd64\n".encode()
    monkeypatch.setattr(pins, "TOOLS", (UNPINNED_RUNC,))
    cfg = cfg_for(tmp_path, tools_source="release", tools_mirror=server.url)
    assert cfg.tools_mirror.startswith("http://")
    with pytest.raises(CaptainError) as err:
        tools.build(cfg, Runner())
    assert str(err.value) == "no pinned sha256 for runc 1.4.0 (amd64); use --tools-source go"
    assert server.requests == []
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*runc*"))


# --- source choice -------------------------------------------------------------------------


def test_auto_falls_back_to_go_when_the_host_refuses(tmp_path, capsys):
    cfg = cfg_for(tmp_path, tools_mirror=closed_port_url())
    chosen = tools.choose_sources(cfg)
    assert set(chosen.values()) == {ToolsSource.GO}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "go for all" in lines[0] and "does not answer" in lines[0]


def test_auto_takes_releases_where_digests_are_pinned(server, tmp_path, capsys):
    chosen = tools.choose_sources(cfg_for(tmp_path, tools_mirror=server.url))
    assert set(chosen.values()) == {ToolsSource.RELEASE}
    chosen = tools.choose_sources(cfg_for(tmp_path, tools_mirror=server.url), (UNPINNED_RUNC, CONTAINERD))
    assert chosen == {"runc": ToolsSource.GO, "containerd": ToolsSource.RELEASE}
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "go for runc 1.4.0 (no pinned sha256)" in line


def test_release_source_refuses_unverifiable_components_before_any_download(tmp_path):
    cfg = cfg_for(tmp_path, tools_source="release", tools_mirror=closed_port_url())
    with pytest.raises(CaptainError) as err:
        tools.choose_sources(cfg, [UNPINNED_RUNC, CONTAINERD])
    assert str(err.value) == "no pinned sha256 for runc 1.4.0 (amd64); use --tools-source go"


def test_release_source_takes_every_pinned_component(tmp_path, capsys):
    chosen = tools.choose_sources(cfg_for(tmp_path, tools_source="release", tools_mirror=closed_port_url()))
    assert set(chosen.values()) == {ToolsSource.RELEASE}
    assert "release for all (requested" in capsys.readouterr().err


def test_go_source_needs_no_network(tmp_path):
    def no_probe(url: str) -> str | None:
        raise AssertionError("go must not probe the release host")

    chosen = tools.choose_sources(cfg_for(tmp_path, tools_source="go"), probe=no_probe)
    assert set(chosen.values()) == {ToolsSource.GO}


# --- cache keys ----------------------------------------------------------------------------


def keys(cfg: config.Config, table: tuple[pins.ToolPin, ...], source: ToolsSource) -> dict[str, str]:
    return {p.name: cache.key(tools.component_parts(cfg, p, source, "go1.26.8")) for p in table}


@pytest.mark.parametrize("source", [ToolsSource.GO, ToolsSource.RELEASE])
def test_a_pin_bump_changes_only_that_components_key(tmp_path, source):
    cfg = cfg_for(tmp_path)
    before = keys(cfg, PINNED, source)
    bumped = tuple(dataclasses.replace(p, version="2.2.2", sha256={"amd64": "1" * 64, "arm64": "2" * 64},
                                       module_h1="h1:" + "A" * 43 + "=") if p.name == "nerdctl" else p
                   for p in PINNED)
    after = keys(cfg, bumped, source)
    assert after["nerdctl"] != before["nerdctl"]
    assert {n: k for n, k in after.items() if n != "nerdctl"} == {n: k for n, k in before.items() if n != "nerdctl"}


def test_keys_differ_by_arch_source_and_go_version(tmp_path):
    amd64, arm64 = cfg_for(tmp_path), cfg_for(tmp_path, arch="arm64")
    go = tools.component_parts(amd64, RUNC, ToolsSource.GO, "go1.26.8")
    assert go != tools.component_parts(arm64, RUNC, ToolsSource.GO, "go1.26.8")
    assert go != tools.component_parts(amd64, RUNC, ToolsSource.GO, "go1.27.0")
    assert go != tools.component_parts(amd64, PINNED[1], ToolsSource.RELEASE, "go1.26.8")
    assert go["libseccomp"] == pins.LIBSECCOMP["amd64"].sha256
    assert "libseccomp" not in tools.component_parts(amd64, NERDCTL, ToolsSource.GO, "go1.26.8")


def test_the_mirror_is_not_part_of_a_key(tmp_path):
    # The digest is what matters: the same verified file from a mirror is the same input.
    plain, mirrored = cfg_for(tmp_path), cfg_for(tmp_path, tools_mirror="https://mirror.example")
    assert (tools.component_parts(plain, CONTAINERD, ToolsSource.RELEASE, "") ==
            tools.component_parts(mirrored, CONTAINERD, ToolsSource.RELEASE, ""))


# --- go build command lines ----------------------------------------------------------------


def test_go_build_argv_is_static_stripped_trimmed_and_versioned():
    shim = next(b for b in CONTAINERD.builds if b.binary == "containerd-shim-runc-v2")
    argv = tools.go_build_argv("go", shim, "2.2.1", "abc", Path("/o/containerd-shim-runc-v2"))
    assert argv[:6] == ["go", "build", "-p", "2", "-v", "-trimpath"]
    assert argv[argv.index("-tags") + 1] == "urfave_cli_no_docs,no_grpc"
    ldflags = argv[argv.index("-ldflags") + 1]
    assert ldflags.startswith("-s -w ")
    assert "-X github.com/containerd/containerd/v2/version.Version=v2.2.1" in ldflags
    assert "-X github.com/containerd/containerd/v2/version.Revision=abc" in ldflags
    assert argv[-3:] == ["-o", "/o/containerd-shim-runc-v2", "./cmd/containerd-shim-runc-v2"]
    assert "-a" in tools.go_build_argv("go", shim, "2.2.1", "", Path("/o/x"), rebuild=True)


def test_runc_is_a_static_pie_with_seccomp():
    argv = tools.go_build_argv("go", RUNC.builds[0], "1.4.0", "", Path("/o/runc"))
    assert "-buildmode=pie" in argv
    assert argv[argv.index("-tags") + 1] == "seccomp,urfave_cli_no_docs,netgo,osusergo"
    assert "-linkmode external -extldflags -static-pie" in argv[argv.index("-ldflags") + 1]


def test_cgo_env_uses_the_pinned_libseccomp_and_a_cross_compiler(tmp_path):
    env = tools.cgo_env(cfg_for(tmp_path, arch="arm64"), Path("/seccomp"))
    assert env["CGO_ENABLED"] == "1"
    assert env["CC"] == ("gcc" if Arch.ARM64.is_host() else "aarch64-linux-gnu-gcc")
    assert env["PKG_CONFIG_LIBDIR"] == "/seccomp/usr/lib/aarch64-linux-gnu/pkgconfig"
    assert env["PKG_CONFIG_SYSROOT_DIR"] == "/seccomp"
    assert tools.go_env(cfg_for(tmp_path))["GOFLAGS"] == "-mod=mod"
    assert tools.go_env(cfg_for(tmp_path))["GOMODCACHE"] == str(tmp_path / "cache" / "go" / "mod")


class FailingRunner(Runner):
    """A go build that writes a log and fails, like a compile error does."""

    def run(self, argv, *, env=None, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["log_file"].parent.mkdir(parents=True, exist_ok=True)
        kwargs["log_file"].write_text("# github.com/x/y\n./main.go:3:1: syntax error: unexpected }\n")
        raise CaptainError(f"command failed with exit code 1: {' '.join(map(str, argv))}")


def test_go_build_failure_is_one_line_with_the_compiler_error(tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(CaptainError) as err:
        tools._run_go_build(cfg, FailingRunner(), NERDCTL, "nerdctl", ["go", "build"], {}, tmp_path)
    assert err.value.message == ("go build of nerdctl (nerdctl 2.2.1, amd64) failed: "
                                 "./main.go:3:1: syntax error: unexpected }")
    assert err.value.hint == f"full log: {tmp_path / 'cache' / 'logs' / 'tools-nerdctl-nerdctl-amd64.log'}"


# --- binary checks -------------------------------------------------------------------------


def test_elf_machine_reads_the_header(tmp_path):
    for arch in Arch:
        (tmp_path / arch.value).write_bytes(fake_elf(arch.elf_machine()))
        assert tools.elf_machine(tmp_path / arch.value) == arch.elf_machine()
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(CaptainError, match="is not an ELF binary"):
        tools.elf_machine(tmp_path / "script")


def test_a_binary_for_the_wrong_arch_is_refused(tmp_path):
    path = tmp_path / "ctr"
    path.write_bytes(fake_elf(Arch.ARM64.elf_machine()))
    path.chmod(0o755)
    with pytest.raises(CaptainError, match="ctr is built for ELF machine 183, not amd64"):
        tools.check_binary(Runner(), path, Arch.AMD64, CONTAINERD, "ctr")
    path.chmod(0o644)
    with pytest.raises(CaptainError, match="ctr is not executable"):
        tools.check_binary(Runner(), path, Arch.ARM64, CONTAINERD, "ctr")


@pytest.mark.skipif(not Arch.AMD64.is_host(), reason="runs an amd64 host binary")
def test_version_check_runs_the_binary_and_wants_the_exact_version(tmp_path):
    echo = tmp_path / "echo"
    shutil.copy(shutil.which("echo") or "/bin/echo", echo)
    pin = dataclasses.replace(NERDCTL, builds=(dataclasses.replace(NERDCTL.builds[0], binary="echo"),),
                              version_args={"echo": ("nerdctl version v2.2.1",)})
    assert tools.check_binary(Runner(), echo, Arch.AMD64, pin, "echo") == "nerdctl version v2.2.1"
    for reported in ("nerdctl version 2.2.1+unknown", "nerdctl version 2.2.10", "nerdctl version 12.2.1"):
        wrong = dataclasses.replace(pin, version_args={"echo": (reported,)})
        with pytest.raises(CaptainError, match=re.escape(f"reported '{reported}', not version 2.2.1")):
            tools.check_binary(Runner(), echo, Arch.AMD64, wrong, "echo")


def test_foreign_arch_binaries_are_checked_but_not_run_without_an_emulator(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "emulator", lambda arch: None)
    foreign = next(a for a in Arch if not a.is_host())
    path = tmp_path / "runc"
    path.write_bytes(fake_elf(foreign.elf_machine()))
    path.chmod(0o755)
    assert tools.check_binary(Runner(), path, foreign, RUNC, "runc").startswith("not run")


def test_foreign_arch_binaries_run_through_the_emulator(tmp_path, monkeypatch):
    assert tools.emulator(Arch.host()) is None
    monkeypatch.setattr(tools, "emulator", lambda arch: shutil.which("echo"))  # "runs" by echoing its argv
    foreign = next(a for a in Arch if not a.is_host())
    path = tmp_path / "runc"
    path.write_bytes(fake_elf(foreign.elf_machine()))
    path.chmod(0o755)
    pin = dataclasses.replace(RUNC, version_args={"runc": ("runc version 1.4.0",)})
    assert tools.check_binary(Runner(), path, foreign, pin, "runc") == f"{path} runc version 1.4.0"


# --- the stage entry -----------------------------------------------------------------------


def fake_components(tmp_path: Path) -> dict[str, Path]:
    entries = {}
    for pin in pins.TOOLS:
        entry = tmp_path / "components" / pin.name
        (entry / "bin").mkdir(parents=True)
        binaries = {}
        for binary in pin.binaries:
            path = entry / "bin" / binary
            path.write_bytes(fake_elf(62) + binary.encode())
            path.chmod(0o755)
            binaries[binary] = {"sha256": cache.sha256_file(path), "path": f"/{pin.dest}/{binary}"}
        record = {"name": pin.name, "version": pin.version, "source": "go", "binaries": binaries}
        (entry / tools.COMPONENT).write_text(json.dumps(record))
        entries[pin.name] = entry
    for name in tools.OWN_PROGRAMS:
        entries[name] = fake_program(tmp_path / "components", name, Arch.AMD64)
    return entries


def fake_program(root: Path, name: str, arch: Arch) -> Path:
    """An entry of one of our Go programs as build_program leaves it (a fake ELF, never run)."""
    entry = root / name
    (entry / "bin").mkdir(parents=True)
    path = entry / "bin" / name
    path.write_bytes(fake_elf(arch.elf_machine()) + name.encode())
    path.chmod(0o755)
    (entry / tools.COMPONENT).write_text(json.dumps({"program": name, "sha256": cache.sha256_file(path)}))
    return entry


def test_assemble_lays_out_the_tree_with_exec_bits_and_the_manifest(tmp_path):
    cfg = cfg_for(tmp_path)
    work = tmp_path / "entry"
    tools.assemble(cfg, fake_components(tmp_path), work)
    for dest, names in (("usr/bin", ["containerd", "containerd-shim-runc-v2", "ctr", "nerdctl", "runc"]),
                        ("opt/cni/bin", ["bridge", "firewall", "host-local", "loopback", "portmap", "tuning"])):
        found = sorted(p.name for p in (work / "tree" / dest).iterdir())
        assert found == names
        assert all((work / "tree" / dest / n).stat().st_mode & 0o777 == 0o755 for n in names)
    manifest = json.loads((work / "manifest.json").read_text())
    assert (work / "tree/usr/share/captainos/tools-manifest.json").read_text() == (work / "manifest.json").read_text()
    assert manifest["arch"] == "amd64"
    assert manifest["components"]["runc"]["version"] == "1.4.0"
    assert manifest["programs"]["reboot-guard"]["path"] == "/usr/lib/captainos/reboot-guard"
    assert (work / "tree/usr/lib/captainos/reboot-guard").stat().st_mode & 0o777 == 0o755
    tools.verify_entry(work, Arch.AMD64)


def test_verify_entry_notices_a_changed_or_missing_binary(tmp_path):
    work = tmp_path / "entry"
    tools.assemble(cfg_for(tmp_path), fake_components(tmp_path), work)
    bridge = work / "tree/opt/cni/bin/bridge"
    bridge.write_bytes(fake_elf(62) + b"tampered")
    with pytest.raises(CaptainError, match="bridge does not match its manifest"):
        tools.verify_entry(work, Arch.AMD64)
    bridge.unlink()
    with pytest.raises(CaptainError, match="bridge is missing or not executable"):
        tools.verify_entry(work, Arch.AMD64)


def test_verify_entry_notices_a_changed_program(tmp_path):
    work = tmp_path / "entry"
    tools.assemble(cfg_for(tmp_path), fake_components(tmp_path), work)
    (work / "tree/usr/lib/captainos/reboot-guard").write_bytes(b"tampered")
    with pytest.raises(CaptainError, match="reboot-guard is missing or does not match its manifest"):
        tools.verify_entry(work, Arch.AMD64)


def test_nothing_partial_enters_the_cache_when_a_component_fails(server, tmp_path):
    cfg = cfg_for(tmp_path, tools_mirror=server.url)
    pin = pin_serving(CONTAINERD, server, containerd_archive(ctr=True))
    with pytest.raises(CaptainError, match="has no ctr"):
        tools.build_component(cfg, Runner(), pin, ToolsSource.RELEASE, "")
    stage = tmp_path / "cache" / "tools-containerd" / "amd64"
    assert [p.name for p in stage.iterdir() if p.suffix != ".lock"] == []


# --- the whole stage through the release source (fake arm64 binaries, never run) -----------


def fixture_release(pin: pins.ToolPin, arch: Arch) -> bytes:
    """What upstream ships for pin: an archive with the binaries (and extras), or a bare binary."""
    elf = fake_elf(arch.elf_machine())
    if not pin.archive:
        return elf + pin.name.encode()
    extras = {"bin/containerd-stress": elf} if pin.name == "containerd" else {"README": b"not kept"}
    top = "bin/" if pin.name == "containerd" else "./"
    return make_tar({**{f"{top}{b}": elf + b.encode() for b in pin.binaries}, **extras})


@pytest.fixture
def released(server, monkeypatch):
    """pins.TOOLS with every arm64 digest matching fixture archives served by the local server
    (the fake binaries are not run: no emulator)."""
    monkeypatch.setattr(tools, "emulator", lambda arch: None)
    # Our own programs are compiled for real in tests/unit/test_programs.py.
    monkeypatch.setattr(tools, "build_program", lambda cfg, runner, name: fake_program(
        cfg.cache_dir / "programs", name, cfg.arch) if not (cfg.cache_dir / "programs" / name).exists()
        else cfg.cache_dir / "programs" / name)
    def serve(table: tuple[pins.ToolPin, ...]) -> tuple[pins.ToolPin, ...]:
        table = tuple(pin_serving(p, server, fixture_release(p, Arch.ARM64), Arch.ARM64) for p in table)
        monkeypatch.setattr(pins, "TOOLS", table)
        return table

    serve(pins.TOOLS)
    return serve


@pytest.mark.skipif(Arch.ARM64.is_host(), reason="the fake arm64 binaries would be run on an arm64 host")
def test_release_stage_end_to_end_then_cached_then_one_pin_bumped(server, released, tmp_path, capsys):
    cfg = cfg_for(tmp_path, arch="arm64", tools_source="release", tools_mirror=server.url)
    entry = tools.build(cfg, Runner())
    tree = entry / "tree"
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()) == sorted(
        [f"usr/bin/{b}" for b in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "nerdctl")]
        + [f"opt/cni/bin/{b}" for b in ("bridge", "host-local", "loopback", "portmap", "firewall", "tuning")]
        + ["usr/share/captainos/tools-manifest.json", "usr/lib/captainos/reboot-guard"])
    assert all(p.stat().st_mode & 0o111 for p in (tree / "usr/bin").iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    runc = manifest["components"]["runc"]
    assert runc["source"] == "release" and runc["url"] == tools.release_url(cfg, pins.TOOLS[1])
    assert runc["binaries"]["runc"]["sha256"] == cache.sha256_file(tree / "usr/bin/runc")
    assert len(server.requests) == 4

    capsys.readouterr()
    assert tools.build(cfg, Runner()) == entry
    assert len(server.requests) == 4, "a cached stage downloads nothing"
    assert capsys.readouterr().err.count("cached:") == 5

    bumped = tuple(dataclasses.replace(p, version="2.2.2") if p.name == "nerdctl" else p for p in pins.TOOLS)
    released(bumped)
    again = tools.build(cfg, Runner())
    assert again != entry
    assert server.requests[4:] == ["/containerd/nerdctl/releases/download/v2.2.2/nerdctl-2.2.2-linux-arm64.tar.gz"]
    err = capsys.readouterr().err
    assert err.count("cached:") == 3 and "cached: tools-nerdctl" not in err


def test_force_tools_redoes_every_component(server, released, tmp_path, capsys):
    cfg = cfg_for(tmp_path, arch="arm64", tools_source="release", tools_mirror=server.url)
    tools.build(cfg, Runner())
    capsys.readouterr()
    tools.build(dataclasses.replace(cfg, forced={"tools"}), Runner())
    assert "cached:" not in capsys.readouterr().err
    assert len(server.requests) == 4, "verified downloads are reused even when forced"


def test_a_binary_that_cannot_run_is_one_clear_error(tmp_path):
    host = Arch.host()
    path = tmp_path / "ctr"
    path.write_bytes(fake_elf(host.elf_machine()))
    path.chmod(0o755)
    with pytest.raises(CaptainError, match=r"cannot run .*ctr"):
        tools.check_binary(Runner(), path, host, CONTAINERD, "ctr")


# --- the go source against a local module proxy (go mod download only, nothing compiled) ----


def fake_module_files(path: str, version: str) -> dict[str, bytes]:
    """A GOPROXY layout serving one module version."""
    gomod = f"module {path}\n\ngo 1.22\n".encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{path}@{version}/go.mod", gomod)
        zf.writestr(f"{path}@{version}/main.go", "package main\n\nfunc main() {}\n")
    base = f"/{path}/@v/{version}"
    return {f"{base}.info": json.dumps({"Version": version, "Time": "2025-01-01T00:00:00Z"}).encode(),
            f"{base}.mod": gomod, f"{base}.zip": buf.getvalue()}


needs_go = pytest.mark.skipif(shutil.which("go") is None and not Path("/usr/local/go/bin/go").is_file(),
                              reason="needs the Go toolchain")


@needs_go
def test_go_source_refuses_a_module_whose_hash_is_not_the_pinned_one(server, tmp_path, monkeypatch):
    server.files.update(fake_module_files("example.com/fake", "v1.0.0"))
    monkeypatch.setenv("GOPROXY", server.url)
    monkeypatch.setattr(pins, "GO_SUMDB", "off")  # sum.golang.org knows no example.com module
    pin = dataclasses.replace(NERDCTL, name="fake", version="1.0.0", module_path="example.com/fake",
                              module_h1="h1:" + "A" * 43 + "=")
    (tmp_path / "w" / "bin").mkdir(parents=True)
    with pytest.raises(CaptainError, match=r"example\.com/fake@v1\.0\.0 has hash h1:\S+, pinned h1:AAAA"):
        tools.from_go(cfg_for(tmp_path), Runner(), pin, tmp_path / "w" / "bin")
    assert not (tmp_path / "w" / "src").exists()


@needs_go
def test_go_source_with_an_unreachable_proxy_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GOPROXY", closed_port_url())
    (tmp_path / "w" / "bin").mkdir(parents=True)
    with pytest.raises(CaptainError, match=r"go mod download github\.com/containerd/nerdctl/v2@v2\.2\.1: .*refused"):
        tools.from_go(cfg_for(tmp_path), Runner(), NERDCTL, tmp_path / "w" / "bin")


def fake_go(tmp_path: Path, pin: pins.ToolPin) -> Path:
    """A `go` that serves pin's module from a local directory and "builds" a file per binary."""
    module = tmp_path / "module"
    module.mkdir()
    (module / "go.mod").write_text(f"module {pin.module_path}\n")
    (module / "go.sum").write_text("")
    download = json.dumps({"Path": pin.module_path, "Version": pin.module.version, "Sum": pin.module_h1,
                           "Dir": str(module), "Origin": {"Hash": "c0ffee"}})
    go = tmp_path / "toolchain" / "bin" / "go"
    go.parent.mkdir(parents=True)
    go.write_text(f"""#!{sys.executable}
import sys
args = sys.argv[1:]
if args[:2] == ["env", "GOVERSION"]:
    print("go{pins.GO_TOOLCHAIN.version}")
elif args[:3] == ["mod", "download", "-json"]:
    print({download!r})
elif args[:1] == ["build"]:
    open(args[args.index("-o") + 1], "wb").write(b"built")
else:
    sys.exit("unexpected: " + " ".join(args))
""")
    go.chmod(0o755)
    return go


def test_the_manifest_names_the_go_that_built_and_nothing_of_this_host(tmp_path, monkeypatch):
    go = fake_go(tmp_path, CONTAINERD)
    monkeypatch.setattr(golang, "go_binary", lambda: str(go))
    records = []
    for no_cache in ("0", "1"):
        bin_dir = tmp_path / f"work-{no_cache}" / "bin"
        bin_dir.mkdir(parents=True)
        records.append(tools.from_go(cfg_for(tmp_path, no_cache=no_cache), Runner(), CONTAINERD, bin_dir))
    assert records[0]["go"] == f"go{pins.GO_TOOLCHAIN.version}"
    assert records[0] == records[1]  # NO_CACHE rebuilds (go build -a), the same thing
    # No path of this machine (the go binary, the work dir) goes into what the image carries.
    assert str(tmp_path) not in json.dumps(records[0])


@pytest.mark.skipif(not Arch.AMD64.is_host(), reason="uses the host's dynamically linked /bin/true")
def test_a_dynamically_linked_go_build_is_refused(tmp_path, monkeypatch):
    def dynamic_build(cfg, runner, pin, bin_dir):
        shutil.copy("/bin/true", bin_dir / "runc")  # has a PT_INTERP: needs the dynamic loader
        return {}

    monkeypatch.setattr(tools, "from_go", dynamic_build)
    monkeypatch.setattr(tools, "check_binary", lambda *args: "runc version 1.4.0")
    assert not tools.is_static(Path("/bin/true"))
    with pytest.raises(CaptainError, match="runc: runc was built dynamically linked"):
        tools.build_component(cfg_for(tmp_path), Runner(), RUNC, ToolsSource.GO, "go1.26.8")
    assert [p for p in (tmp_path / "cache" / "tools-runc" / "amd64").iterdir() if p.suffix != ".lock"] == []
