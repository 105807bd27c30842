"""tools stage: containerd, runc, nerdctl and the CNI plugins at the pinned versions, verified.

Each component comes from one of two sources (pins.TOOLS says what and where):
- release: the upstream release file, sha256-checked against the pin before it is unpacked
  (only ever against the pin: never against a list served by the release host or mirror, so a
  plain-HTTP TOOLS_MIRROR can serve nothing but the pinned bytes);
- go: the pinned Go module (hash-checked against the pin), built with the pinned Go toolchain
  the way the module's own Makefile builds it (tags, -X version flags), stripped.
`auto` takes the release where the release host answers and a digest is pinned, Go otherwise.

Every component is its own cache entry (stage tools-<name>), keyed by version, arch, source and
digests, so a bumped pin rebuilds that component only. The stage entry joins them into
    tree/usr/bin/{containerd,containerd-shim-runc-v2,ctr,runc,nerdctl}
    tree/opt/cni/bin/{bridge,host-local,loopback,portmap,firewall,tuning}
    tree/usr/lib/captainos/reboot-guard (our own program, programs/reboot-guard: C, the image's glibc)
    tree/usr/share/captainos/tools-manifest.json, manifest.json
Each binary is checked before it enters a cache entry: an ELF for the target architecture,
executable, and reporting the pinned version when run (on a host of another architecture only
through qemu-user-static, when installed).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from captainos.core import cache, log, needs, pins
from captainos.core.config import Arch, Config, ToolsSource
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.sources import debian, fetch, golang

STAGE = "tools"
MANIFEST = "manifest.json"
COMPONENT = "component.json"
IMAGE_MANIFEST = "usr/share/captainos/tools-manifest.json"
GO_JOBS = "2"  # the build host's cores are shared
PROGRAMS = Path(__file__).resolve().parents[2] / "programs"
# Our own programs (programs/<name>/<name>.c): name -> where the image has it.
OWN_PROGRAMS = {"reboot-guard": "usr/lib/captainos/reboot-guard"}
C_FLAGS = ("-Os", "-s", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong")
VERSION_TIMEOUT = 30.0


# --- where each component comes from -------------------------------------------------------

def release_base(cfg: Config) -> str:
    return cfg.tools_mirror.rstrip("/") or pins.TOOLS_RELEASE_HOST


def release_url(cfg: Config, pin: pins.ToolPin) -> str:
    return f"{release_base(cfg)}/{pin.release_path(cfg.arch.value)}"


def release_digest(pin: pins.ToolPin, arch: Arch) -> str | None:
    if arch.value not in pin.sha256:
        known = ", ".join(sorted(pin.sha256))
        raise CaptainError(f"{pin.name} {pin.version} has no release for {arch.value}", f"known: {known}")
    return pin.sha256[arch.value]


def choose_sources(cfg: Config, table: Iterable[pins.ToolPin] | None = None,
                   probe: Callable[[str], str | None] = fetch.probe) -> dict[str, ToolsSource]:
    """The source of every component, explained in one log line."""
    tools = tuple(pins.TOOLS if table is None else table)
    if cfg.tools_source is ToolsSource.GO:
        log.info("    tools source: go for all (requested)")
        return dict.fromkeys((t.name for t in tools), ToolsSource.GO)
    unpinned = [f"{t.name} {t.version}" for t in tools if release_digest(t, cfg.arch) is None]
    if cfg.tools_source is ToolsSource.RELEASE:
        if unpinned:
            raise CaptainError(f"no pinned sha256 for {', '.join(unpinned)} ({cfg.arch.value}); "
                               "use --tools-source go")
        chosen = dict.fromkeys((t.name for t in tools), ToolsSource.RELEASE)
        why = f"release for all (requested, from {release_base(cfg)})"
    else:
        reason = probe(release_base(cfg))
        if reason is not None:
            chosen = dict.fromkeys((t.name for t in tools), ToolsSource.GO)
            why = f"go for all ({release_base(cfg)} does not answer: {reason})"
        else:
            chosen = {t.name: ToolsSource.GO if release_digest(t, cfg.arch) is None else ToolsSource.RELEASE
                      for t in tools}
            released = [n for n, s in chosen.items() if s is ToolsSource.RELEASE]
            why = f"release from {release_base(cfg)} for {', '.join(released) or 'none'}"
            if unpinned:
                why += f"; go for {', '.join(unpinned)} (no pinned sha256)"
    log.info(f"    tools source: {why}")
    return chosen


# --- checks --------------------------------------------------------------------------------

def elf_machine(path: Path) -> int:
    """e_machine of an ELF file, or a clear error when path is not an ELF executable."""
    with path.open("rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise CaptainError(f"{path} is not an ELF binary")
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def is_static(path: Path) -> bool:
    """True when a 64-bit ELF has no program interpreter (PT_INTERP), i.e. needs no dynamic loader."""
    with path.open("rb") as handle:
        header = handle.read(64)
        order: Literal["little", "big"] = "little" if header[5] == 1 else "big"
        phoff = int.from_bytes(header[32:40], order)
        phentsize, phnum = int.from_bytes(header[54:56], order), int.from_bytes(header[56:58], order)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return all(int.from_bytes(table[i:i + 4], order) != 3 for i in range(0, len(table), phentsize or 1))


def version_pattern(version: str) -> re.Pattern[str]:
    """The pinned version as a whole token (v-prefix allowed), not e.g. 2.2.1+unknown."""
    return re.compile(rf"(?<![\w.])v?{re.escape(version)}(?![\w.+-])")


def emulator(arch: Arch) -> str | None:
    """A user-mode emulator running arch's static binaries on this host (qemu-user-static), if any."""
    if arch.is_host():
        return None
    return shutil.which(f"qemu-{arch.uname()}-static") or shutil.which(f"qemu-{arch.uname()}")


def run_version(runner: Runner, argv: list[str | Path]) -> tuple[int, str]:
    """Exit code and combined output of argv (CNI plugins write their version to stderr)."""
    binary = argv[0]
    with tempfile.TemporaryDirectory(prefix="captainos-version-") as tmp:
        out = Path(tmp) / "out.log"
        try:
            result = runner.run(argv, log_file=out, check=False, timeout=VERSION_TIMEOUT)
        except OSError as exc:
            raise CaptainError(f"cannot run {binary}: {exc.strerror or exc}", "nothing was kept") from None
        return result.returncode, out.read_text(errors="replace")


def check_binary(runner: Runner, path: Path, arch: Arch, pin: pins.ToolPin, binary: str) -> str:
    """Check one binary; return the line reporting its version (or why it was not run)."""
    if not path.is_file():
        raise CaptainError(f"{pin.name}: {binary} is missing ({path})")
    if not path.stat().st_mode & 0o111:
        raise CaptainError(f"{pin.name}: {binary} is not executable ({path})")
    machine = elf_machine(path)
    if machine != arch.elf_machine():
        raise CaptainError(f"{pin.name}: {binary} is built for ELF machine {machine}, "
                           f"not {arch.value} ({arch.elf_machine()})", "nothing was kept")
    prefix: list[str | Path] = []
    if not arch.is_host():
        emulated = emulator(arch)
        if emulated is None:
            return f"not run ({arch.value} binary on another host; qemu-user-static would let it run)"
        prefix = [emulated]
    args = pin.version_args.get(binary, ("--version",))
    code, output = run_version(runner, [*prefix, path, *args])
    found = version_pattern(pin.version).search(output)
    if code != 0 or not found:
        first = output.strip().splitlines()[0] if output.strip() else "no output"
        raise CaptainError(f"{pin.name}: `{binary} {' '.join(args)}` exited {code} and reported {first!r}, "
                           f"not version {pin.version}", "the build or the pin is wrong; nothing was kept")
    line_start = output.rfind("\n", 0, found.start()) + 1
    line_end = output.find("\n", found.end())
    return output[line_start:line_end if line_end >= 0 else None].strip()


# --- source: release -----------------------------------------------------------------------

def expected_digest(cfg: Config, pin: pins.ToolPin) -> str:
    """The release file's pinned sha256, or a clear error: nothing else vouches for a release file."""
    digest = release_digest(pin, cfg.arch)
    if digest is None:
        raise CaptainError(f"no pinned sha256 for {pin.name} {pin.version} ({cfg.arch.value}); "
                           "use --tools-source go")
    return digest


def from_release(cfg: Config, pin: pins.ToolPin, bin_dir: Path) -> dict[str, Any]:
    """Download the release file, verify it, keep the pinned binaries."""
    digest = expected_digest(cfg, pin)
    url = release_url(cfg, pin)
    name = posixpath.basename(pin.release_path(cfg.arch.value))
    file = fetch.download(url, cfg.cache_dir / "downloads" / "tools" / name, digest)
    if not pin.archive:
        (binary,) = pin.binaries
        shutil.copyfile(file, bin_dir / binary)
    else:
        unpacked = bin_dir.parent / "unpacked"
        names = fetch.safe_extract(file, unpacked, keep=lambda n: posixpath.basename(n) in pin.binaries)
        for binary in pin.binaries:
            found = [n for n in names if posixpath.basename(n) == binary]
            if len(found) != 1:
                what = "has no" if not found else "has more than one"
                raise CaptainError(f"{name} {what} {binary}", f"wanted: {', '.join(pin.binaries)}")
            (unpacked / found[0]).replace(bin_dir / binary)
        shutil.rmtree(unpacked)
    return {"url": url, "sha256": digest}


# --- source: go ----------------------------------------------------------------------------

def go_env(cfg: Config) -> dict[str, str]:
    """golang.go_env (caches under cfg.cache_dir/go, checksum database on, CGO off) + -mod=mod:
    dependencies come from the proxy, checked against the module's own go.sum."""
    return {**golang.go_env(cfg.cache_dir, cfg.arch), "GOFLAGS": "-mod=mod"}


def cgo_env(cfg: Config, seccomp: Path) -> dict[str, str]:
    """cgo against the pinned libseccomp for cfg.arch (a cross compiler for a foreign arch)."""
    triplet = f"{cfg.arch.uname()}-linux-gnu"
    return {
        "CGO_ENABLED": "1",
        "CC": f"{cfg.arch.cross_compile()}gcc",
        "PKG_CONFIG_LIBDIR": str(seccomp / "usr" / "lib" / triplet / "pkgconfig"),
        "PKG_CONFIG_SYSROOT_DIR": str(seccomp),
        "PKG_CONFIG_PATH": "",
    }


def go_build_argv(go: str, build: pins.GoBuild, version: str, revision: str, output: Path,
                  *, rebuild: bool = False) -> list[str]:
    """The `go build` of one binary: static unless cgo, -trimpath, stripped, upstream's tags and -X flags."""
    ldflags = ["-s", "-w", *(flag.format(version=version, revision=revision) for flag in build.ldflags)]
    argv = [go, "build", "-p", GO_JOBS, "-v", "-trimpath", *(["-a"] if rebuild else []), *build.flags]
    if build.tags:
        argv += ["-tags", ",".join(build.tags)]
    return [*argv, "-ldflags", " ".join(ldflags), "-o", str(output), build.package]


def libseccomp(cfg: Config, runner: Runner) -> Path:
    """The pinned libseccomp-dev for cfg.arch, unpacked (its own cache entry)."""
    if cfg.arch.value not in pins.LIBSECCOMP:
        raise CaptainError(f"no libseccomp pinned for {cfg.arch.value}", f"known: {', '.join(pins.LIBSECCOMP)}")
    deb = pins.LIBSECCOMP[cfg.arch.value]

    def produce(work: Path) -> None:
        file = debian.package(deb.name, cfg.arch.value, cache_dir=cfg.cache_dir, pin=deb)
        debian.extract(runner, file, work / "root")

    parts = {"package": deb.name, "version": deb.version, "sha256": deb.sha256}
    return cache.cached(cfg.cache_dir, "tools-libseccomp", cfg.arch.value, parts, force=cfg.force(STAGE),
                        produce=produce) / "root"


def _copy_writable(src: Path, dest: Path) -> None:
    """Copy a (read-only) module cache directory into a writable tree."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copyfile)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def from_go(cfg: Config, runner: Runner, pin: pins.ToolPin, bin_dir: Path) -> dict[str, Any]:
    """Download the pinned module, check its hash, build each binary as upstream does."""
    go = golang.go_binary()
    env = go_env(cfg)
    work = bin_dir.parent
    result = runner.run([go, "mod", "download", "-json", pin.module.query], env=env, cwd=work, capture=True,
                        check=False)
    module = golang.parse_download(result.stdout)  # raises the proxy's error for the module, if any
    if result.returncode != 0:
        raise CaptainError(f"go mod download {pin.module.query} failed with exit code {result.returncode}",
                           "check that the Go module proxy is reachable (GOPROXY)")
    golang.verify(module, (pin.module,))
    info = module[pin.module_path]
    revision = str((info.get("Origin") or {}).get("Hash", ""))
    src = work / "src"
    _copy_writable(Path(info["Dir"]), src)
    builds: dict[str, list[str]] = {}
    record = {"module": pin.module.query, "module_h1": pin.module_h1, "revision": revision,
              "go_mod_sha256": cache.sha256_file(src / "go.mod"), "go_sum_sha256": cache.sha256_file(src / "go.sum"),
              # The version only: where this machine keeps its go is not a fact about the image
              # (recording the path made the same inputs give other bytes on another machine).
              "go": golang.go_version(runner, cfg.cache_dir, cfg.arch), "builds": builds,
              "excluded": list(pin.exclude_files), "dropped": list(pin.drop_requires)}
    for rel in pin.exclude_files:
        if not (src / rel).is_file():
            raise CaptainError(f"{pin.module.query} has no {rel} to exclude", "update exclude_files in pins.py")
        (src / rel).unlink()
    for requirement in pin.drop_requires:
        path = requirement.split("@", 1)[0]
        runner.run([go, "mod", "edit", f"-droprequire={path}", f"-dropreplace={requirement}"], env=env, cwd=src)
    for build in pin.builds:
        build_env = {**env, **(cgo_env(cfg, libseccomp(cfg, runner)) if build.cgo else {})}
        argv = go_build_argv(go, build, pin.version, revision, bin_dir / build.binary, rebuild=cfg.no_cache)
        _run_go_build(cfg, runner, pin, build.binary, argv, build_env, src)
        # What was built, not how hard the cache was ignored: without the go path, -o PATH and
        # NO_CACHE's -a (it rebuilds the same thing), so the manifest is the same either way.
        recorded = go_build_argv("go", build, pin.version, revision, Path("-"))
        builds[build.binary] = recorded[1:-3] + recorded[-1:]
    # The module graph the builds used (-mod=mod may have added go.sum lines), kept with the
    # entry so that the same build can be repeated with -mod=readonly from these two files.
    for name in ("go.mod", "go.sum"):
        shutil.copyfile(src / name, work / name)
    record["go_sum_used_sha256"] = cache.sha256_file(work / "go.sum")
    shutil.rmtree(src)
    return record


def _run_go_build(cfg: Config, runner: Runner, pin: pins.ToolPin, binary: str, argv: list[str],
                  env: Mapping[str, str], src: Path) -> None:
    log_file = cfg.cache_dir / "logs" / f"tools-{pin.name}-{binary}-{cfg.arch.value}.log"
    progress = log.Progress(f"go build {binary} ({cfg.arch.value})")
    lines = 0

    def on_line(_line: str) -> None:
        nonlocal lines
        lines += 1
        progress.update(lines, f"{lines} packages")

    try:
        runner.run(argv, env=env, cwd=src, log_file=log_file, on_line=on_line)
    except CaptainError:
        text = log_file.read_text(errors="replace").strip() if log_file.is_file() else ""
        last = text.splitlines()[-1] if text else "no output"
        raise CaptainError(f"go build of {binary} ({pin.name} {pin.version}, {cfg.arch.value}) failed: {last}",
                           f"full log: {log_file}") from None
    finally:
        progress.close()


# --- cache entries -------------------------------------------------------------------------

def component_parts(cfg: Config, pin: pins.ToolPin, source: ToolsSource, go_version: str) -> dict[str, Any]:
    """Every input of one component's entry: a pin bump changes this component's key only."""
    parts: dict[str, Any] = {"code": cache.code_digest(__file__), "component": pin.name, "version": pin.version,
                             "arch": cfg.arch.value, "source": source.value, "binaries": list(pin.binaries)}
    if source is ToolsSource.RELEASE:
        parts.update(release=pin.release_path(cfg.arch.value), sha256=expected_digest(cfg, pin))
    else:
        parts.update(module=pin.module.query, module_h1=pin.module_h1, go=go_version,
                     builds=[dataclasses.asdict(b) for b in pin.builds],
                     exclude_files=list(pin.exclude_files), drop_requires=list(pin.drop_requires))
        if any(b.cgo for b in pin.builds):
            parts["libseccomp"] = pins.LIBSECCOMP[cfg.arch.value].sha256
    return parts


def build_component(cfg: Config, runner: Runner, pin: pins.ToolPin, source: ToolsSource, go_version: str) -> Path:
    """The entry holding bin/<binary> for each pinned binary and component.json."""

    def produce(work: Path) -> None:
        bin_dir = work / "bin"
        bin_dir.mkdir()
        if source is ToolsSource.RELEASE:
            origin = from_release(cfg, pin, bin_dir)
        else:
            origin = from_go(cfg, runner, pin, bin_dir)
        binaries = {}
        for binary in pin.binaries:
            path = bin_dir / binary
            path.chmod(0o755)
            reported = check_binary(runner, path, cfg.arch, pin, binary)
            static = is_static(path)
            if source is ToolsSource.GO and not static:
                # Every go build here is static (runc links libseccomp statically): a dynamic
                # binary would need libraries the image may not have.
                raise CaptainError(f"{pin.name}: {binary} was built dynamically linked",
                                   "the Go build lost its static flags; nothing was kept")
            binaries[binary] = {"path": f"/{pin.dest}/{binary}", "sha256": cache.sha256_file(path),
                                "size": path.stat().st_size, "static": static, "reports": reported}
            log.info(f"    {pin.name}: {binary} {log.human_bytes(path.stat().st_size)}: {reported}")
        record = {"name": pin.name, "version": pin.version, "source": source.value, **origin, "binaries": binaries}
        (work / COMPONENT).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    parts = component_parts(cfg, pin, source, go_version)
    return cache.cached(cfg.cache_dir, f"{STAGE}-{pin.name}", cfg.arch.value, parts, force=cfg.force(STAGE),
                        produce=produce)


def program_sources(name: str) -> dict[str, str]:
    """sha256 of every file of one of our programs."""
    root = PROGRAMS / name
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not any(p.suffix == ".c" for p in files):
        raise CaptainError(f"{root} holds no C source", "the checkout is incomplete")
    return {str(p.relative_to(root)): cache.sha256_file(p) for p in files}


def compiler(arch: Arch) -> str:
    """The C compiler for arch: the host's gcc, or the cross compiler (setup installs both)."""
    return needs.c_compiler(arch).command


def compile_argv(cc: str, name: str, output: Path) -> list[str]:
    """How one of our programs is built: one C file, against the image's glibc, stripped.
    Run in the program's directory, so that no build path enters the binary."""
    return [cc, *C_FLAGS, "-o", str(output), f"{name}.c"]


def build_program(cfg: Config, runner: Runner, name: str) -> Path:
    """The entry holding bin/<name>, one of our own programs, for cfg.arch."""
    cc = compiler(cfg.arch)
    version = runner.run([cc, "--version"], capture=True).stdout.splitlines()[0]
    parts = {"code": cache.code_digest(__file__), "program": name, "sources": program_sources(name),
             "cc": version, "flags": list(C_FLAGS), "arch": cfg.arch.value}

    def produce(work: Path) -> None:
        output = work / "bin" / name
        output.parent.mkdir()
        try:
            runner.run(compile_argv(cc, name, output), cwd=PROGRAMS / name, log_file=work / "build.log")
        except CaptainError:
            last = (work / "build.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise CaptainError(f"compiling {name} ({cfg.arch.value}) failed: {last[0]}", "nothing was kept") from None
        if elf_machine(output) != cfg.arch.elf_machine():
            raise CaptainError(f"{name} was not built for {cfg.arch.value}", "nothing was kept")
        record = {**parts, "sha256": cache.sha256_file(output), "size": output.stat().st_size}
        (work / COMPONENT).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        log.info(f"    {name}: {log.human_bytes(output.stat().st_size)} ({version})")

    return cache.cached(cfg.cache_dir, f"{STAGE}-{name}", cfg.arch.value, parts, force=cfg.force(STAGE),
                        produce=produce)


def assemble(cfg: Config, components: Mapping[str, Path], work: Path) -> None:
    """The stage entry: every component's binaries in the image tree, plus the manifest."""
    manifest: dict[str, Any] = {"format": 1, "arch": cfg.arch.value, "components": {}, "programs": {}}
    for pin in pins.TOOLS:
        entry = components[pin.name]
        record = json.loads((entry / COMPONENT).read_text())
        for binary in pin.binaries:
            cache.atomic_copy(entry / "bin" / binary, work / "tree" / pin.dest / binary)
        manifest["components"][pin.name] = record
    for name, dest in OWN_PROGRAMS.items():
        entry = components[name]
        cache.atomic_copy(entry / "bin" / name, work / "tree" / dest)
        manifest["programs"][name] = {**json.loads((entry / COMPONENT).read_text()), "path": f"/{dest}"}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (work / MANIFEST).write_text(text)
    cache.atomic_write(work / "tree" / IMAGE_MANIFEST, text)


def verify_entry(entry: Path, arch: Arch) -> None:
    """A stage entry is whole: every pinned binary is there, executable, of the right arch and
    unchanged since its component was checked (sha256 in the manifest)."""
    manifest = json.loads((entry / MANIFEST).read_text())
    for pin in pins.TOOLS:
        record = manifest["components"].get(pin.name, {})
        for binary in pin.binaries:
            path = entry / "tree" / pin.dest / binary
            if not path.is_file() or not path.stat().st_mode & 0o111:
                raise CaptainError(f"{path} is missing or not executable", "rebuild with --force-tools")
            if elf_machine(path) != arch.elf_machine():
                raise CaptainError(f"{path} is not an {arch.value} binary", "rebuild with --force-tools")
            want = record.get("binaries", {}).get(binary, {}).get("sha256")
            if want != cache.sha256_file(path):
                raise CaptainError(f"{path} does not match its manifest", "rebuild with --force-tools")
    for name, dest in OWN_PROGRAMS.items():
        path = entry / "tree" / dest
        want = manifest.get("programs", {}).get(name, {}).get("sha256")
        if not path.is_file() or want != cache.sha256_file(path):
            raise CaptainError(f"{path} is missing or does not match its manifest", "rebuild with --force-tools")


def build(cfg: Config, runner: Runner, *inputs: Path) -> Path:
    """The tools stage entry for cfg.arch (see the module docstring for its layout)."""
    sources = choose_sources(cfg)
    go_version = ""
    if ToolsSource.GO in sources.values():
        go_version = golang.go_version(runner, cfg.cache_dir, cfg.arch)
    components = {pin.name: build_component(cfg, runner, pin, sources[pin.name], go_version) for pin in pins.TOOLS}
    components.update((name, build_program(cfg, runner, name)) for name in OWN_PROGRAMS)
    parts = {"code": cache.code_digest(__file__),
             "components": {name: entry.name for name, entry in components.items()}}
    entry = cache.cached(cfg.cache_dir, STAGE, cfg.arch.value, parts, force=cfg.force(STAGE),
                         produce=lambda work: assemble(cfg, components, work))
    verify_entry(entry, cfg.arch)
    return entry
