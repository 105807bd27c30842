"""The one typed configuration: every option declares its default, help and env var once.

An option is a `Config` field (declared here with `_opt`) or one of a stage's own options,
declared in its row of the stage table (stages/pipeline.py) and made by `stage_options`: how
it runs (`--<stage>-mode`) and, if it has one, its rebuild flag (`--force-<stage>`). Their
values live in `Config.modes` and `Config.forced`, read through `Config.mode(stage)` and
`Config.force(stage)`. The CLI (cli.py), `load` and `summary` go through `Option`s, never
through field names; each stage puts the options it reads into its own cache key.
Precedence: default < environment variable < command-line flag.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import platform
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captainos.core.errors import CaptainError

REPO = Path(__file__).resolve().parents[2]


class Arch(enum.Enum):
    AMD64 = "amd64"
    ARM64 = "arm64"

    # Each fact about an architecture lives here, next to its siblings.
    def uname(self) -> str:
        return {"amd64": "x86_64", "arm64": "aarch64"}[self.value]

    def smee_name(self) -> str:
        """The suffix Smee downloads by default (vmlinuz-x86_64, initramfs-aarch64)."""
        return self.uname()

    def kernel_arch(self) -> str:
        return {"amd64": "x86", "arm64": "arm64"}[self.value]

    def kernel_image(self) -> str:
        """The make target's output, relative to the kernel tree."""
        return {"amd64": "arch/x86/boot/bzImage", "arm64": "arch/arm64/boot/Image"}[self.value]

    def make_target(self) -> str:
        return {"amd64": "bzImage", "arm64": "Image"}[self.value]

    def cross_compile(self) -> str:
        """CROSS_COMPILE prefix when building on a host of another architecture."""
        return "" if self.is_host() else f"{self.uname()}-linux-gnu-"

    def go_arch(self) -> str:
        return self.value

    def mkosi_arch(self) -> str:
        return {"amd64": "x86-64", "arm64": "arm64"}[self.value]

    def elf_machine(self) -> int:
        """e_machine of the ELF header (EM_X86_64 = 62, EM_AARCH64 = 183)."""
        return {"amd64": 62, "arm64": 183}[self.value]

    def qemu_binary(self) -> str:
        return f"qemu-system-{self.uname()}"

    def qemu_machine(self) -> str:
        return {"amd64": "q35", "arm64": "virt"}[self.value]

    def serial_console(self) -> str:
        return {"amd64": "ttyS0", "arm64": "ttyAMA0"}[self.value]

    def efi_target(self) -> str:
        return {"amd64": "x86_64-efi", "arm64": "arm64-efi"}[self.value]

    def is_host(self) -> bool:
        return platform.machine() in (self.uname(), self.value)

    @classmethod
    def host(cls) -> Arch:
        for arch in cls:
            if arch.is_host():
                return arch
        raise CaptainError(f"unsupported host architecture {platform.machine()}")


class StageMode(enum.Enum):
    """Where a stage runs."""

    NATIVE = "native"
    DOCKER = "docker"
    SKIP = "skip"


class KernelSource(enum.Enum):
    """Where the kernel comes from (see sources/kernel.py)."""

    AUTO = "auto"  # KERNEL_SRC if set, else kernel.org if reachable, else debian-source
    LOCAL = "local"  # KERNEL_SRC tree
    KERNEL_ORG = "kernel-org"  # release tarball, sha256-verified
    DEBIAN_SOURCE = "debian-source"  # Debian's linux-source package, compiled with our config
    DEBIAN_IMAGE = "debian-image"  # Debian's prebuilt linux-image, nothing compiled


class ToolsSource(enum.Enum):
    """Where the container stack binaries come from (see tools.py)."""

    AUTO = "auto"  # release when the release host answers, else go
    RELEASE = "release"
    GO = "go"


class Accel(enum.Enum):
    AUTO = "auto"  # KVM when a probe guest runs, else TCG
    KVM = "kvm"
    TCG = "tcg"


_SIZE = re.compile(r"^[1-9][0-9]*[MG]$")


def _opt(default: Any, help: str, env: str | None = None, *, metavar: str | None = None) -> Any:
    """Declare an option. env defaults to the upper-cased field name. Each stage puts the
    options that change what it produces into its own cache key."""
    meta = {"help": help, "env": env, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence options")
    return field(default=default, metadata=meta)


DEFAULT_MODE = StageMode.NATIVE  # every stage's, until its option says otherwise


@dataclass(frozen=True)
class Config:
    arch: Arch = _opt(Arch.AMD64, "target architecture")
    out_dir: Path = _opt(Path("out"), "where artifacts are written")
    cache_dir: Path = _opt(Path.home() / ".cache" / "captainos", "cache of downloads and built stages",
                           "CAPTAINOS_CACHE")
    kernel_source: KernelSource = _opt(KernelSource.AUTO, "where the kernel comes from")
    kernel_src: Path | None = _opt(None, "local kernel source tree (implies --kernel-source local)",
                                   metavar="DIR")
    kernel_version: str = _opt("6.12.69", "kernel.org release to build")
    tools_source: ToolsSource = _opt(ToolsSource.AUTO, "where containerd/runc/nerdctl/CNI come from")
    tools_mirror: str = _opt("", "base URL replacing the upstream release host (air-gapped sites)",
                             metavar="URL")
    no_cache: bool = _opt(False, "ignore every cache: rebuild the builder image and all stages")
    profiles: tuple[str, ...] = _opt((), "comma-separated mkosi profiles (e.g. test)", metavar="LIST")
    extra_ca_certs: tuple[Path, ...] = _opt((), "comma-separated PEM files added to the image's trust store",
                                           metavar="FILES")
    embed_images: Path | None = _opt(None, "file of container images to embed, one 'SOURCE [TARGET]' a line: "
                                     "pulled at build time, imported at boot (air-gapped sites)", metavar="FILE")
    ssh_authorized_keys: Path | None = _opt(None, "authorized_keys file: the image runs an SSH server (keys only) "
                                            "that accepts these keys", metavar="FILE")
    iso_cmdline: str = _opt("", "kernel parameters baked into the ISO's boot entry (e.g. a static ipam=)")
    secure_boot: bool = _opt(False, "ISO boots through Debian's signed shim and GRUB (needs --kernel-source "
                             "debian-image for a signed kernel)")
    hub_actions_src: Path | None = _opt(None, "git repository of github.com/tinkerbell/actions holding the pinned "
                                        "commit: the lab builds the hub actions from it", "CAPTAINOS_HUB_ACTIONS",
                                        metavar="DIR")
    qemu_append: str = _opt("", "extra kernel command line for qemu-test")
    qemu_mem: str = _opt("2G", "guest memory for qemu-test (e.g. 512M, 2G)")
    qemu_smp: int = _opt(2, "guest CPUs for qemu-test")
    qemu_accel: Accel = _opt(Accel.AUTO, "QEMU accelerator")
    # The stages' own options (stage_options), by stage name: not options themselves.
    modes: Mapping[str, StageMode] = field(default_factory=dict)  # absent: DEFAULT_MODE
    forced: frozenset[str] = frozenset()  # stages whose --force-<stage> is on

    def __post_init__(self) -> None:
        if not _SIZE.match(self.qemu_mem):
            raise CaptainError(f"invalid qemu memory size (QEMU_MEM/--qemu-mem) {self.qemu_mem!r}",
                               "use a size like 512M or 2G")
        if self.qemu_smp < 1:
            raise CaptainError(f"invalid CPU count (QEMU_SMP/--qemu-smp) {self.qemu_smp}",
                               "use a positive number of CPUs")
        if self.kernel_src is not None and self.kernel_source not in (KernelSource.AUTO, KernelSource.LOCAL):
            raise CaptainError("KERNEL_SRC is set but the kernel source is "
                               f"{self.kernel_source.value}", "unset one of them")
        if self.tools_mirror and not re.match(r"^https?://", self.tools_mirror):
            raise CaptainError(f"invalid tools mirror {self.tools_mirror!r}", "use an http:// or https:// URL")
        # Frozen all the way down, and a default mode never stored: equal configs compare equal.
        modes = {stage: mode for stage, mode in self.modes.items() if mode is not DEFAULT_MODE}
        object.__setattr__(self, "modes", types.MappingProxyType(modes))
        object.__setattr__(self, "forced", frozenset(self.forced))

    # Derived paths: every stage agrees on them through here.
    @property
    def build_dir(self) -> Path:
        return REPO / "build" / self.arch.value

    def mode(self, stage: str) -> StageMode:
        """How this stage runs: its `--<stage>-mode`."""
        return self.modes.get(stage, DEFAULT_MODE)

    def force(self, stage: str) -> bool:
        """Rebuild this stage's entries even when cached: NO_CACHE for every stage, and a
        stage's own `--force-<stage>` (FORCE_KERNEL, FORCE_TOOLS) for its. The one rule every
        cache lookup uses."""
        return self.no_cache or stage in self.forced

    def to_json(self, stages: Sequence[Option] = ()) -> dict[str, Any]:
        """Every option's value by name: the fields', then the given stage options'."""
        return {opt.name: _jsonable(opt.get(self)) for opt in (*options(), *stages)}


@dataclass(frozen=True)
class Option:
    """One option: its flag (`--name-with-dashes`), env var, type, default and help."""

    name: str
    kind: Any  # the value's type (of each item, for a sequence): an enum, Path, bool, int or str
    default: Any
    help: str
    env: str
    metavar: str | None = None
    sequence: bool = False  # a comma-separated tuple
    stage: str = ""  # the stage whose mode (kind StageMode) or force (bool) this is; "": a Config field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> list[str] | None:
        is_enum = isinstance(self.kind, type) and issubclass(self.kind, enum.Enum)
        return [m.value for m in self.kind] if is_enum else None

    def get(self, cfg: Config) -> Any:
        if not self.stage:
            return getattr(cfg, self.name)
        return cfg.mode(self.stage) if self.kind is StageMode else self.stage in cfg.forced


_KINDS = {"Arch": Arch, "StageMode": StageMode, "KernelSource": KernelSource, "ToolsSource": ToolsSource,
          "Accel": Accel, "Path": Path, "bool": bool, "int": int, "str": str}


def _field_option(f: dataclasses.Field[Any]) -> Option:
    """The option a Config field declares: its type from the annotation (X | None is X,
    tuple[X, ...] a sequence of X)."""
    text = str(f.type).replace("| None", "").strip()
    sequence = text.startswith("tuple[")
    kind = _KINDS[text[len("tuple["):].split(",")[0] if sequence else text]
    return Option(f.name, kind, f.default, f.metadata["help"], f.metadata["env"] or f.name.upper(),
                  f.metadata["metavar"], sequence)


def options() -> tuple[Option, ...]:
    """The Config fields' options, in declaration order."""
    return tuple(_field_option(f) for f in dataclasses.fields(Config) if "help" in f.metadata)


def stage_options(stage: str, mode_help: str, force_help: str = "") -> tuple[Option, ...]:
    """A stage's own options, as its row in the stage table declares them: `--<stage>-mode`
    (env <STAGE>_MODE, default native) and, given force_help, `--force-<stage>` (env
    FORCE_<STAGE>)."""
    mode = Option(f"{stage}_mode", StageMode, DEFAULT_MODE, mode_help, f"{stage.upper()}_MODE", stage=stage)
    if not force_help:
        return (mode,)
    return mode, Option(f"force_{stage}", bool, False, force_help, f"FORCE_{stage.upper()}", stage=stage)


@dataclass(frozen=True)
class Flag:
    """A verb's own argument: argparse's names and keywords (cli.py adds it to that verb
    alone, and it is no Config option). With short_for, a shorter name for that option
    (`iso --cmdline` for --iso-cmdline), read and checked as the option is."""

    names: tuple[str, ...]
    kwargs: Mapping[str, Any]
    short_for: str = ""


def flag(*names: str, short_for: str = "", **kwargs: Any) -> Flag:
    return Flag(names, kwargs, short_for)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def parse_value(opt: Option, raw: str, source: str) -> Any:
    """Turn a string from the environment or a flag into the option's type, or fail clearly."""
    if opt.sequence:
        return tuple(_parse_one(opt.kind, part.strip(), source) for part in raw.split(",") if part.strip())
    return _parse_one(opt.kind, raw, source)


def _parse_one(kind: Any, raw: str, source: str) -> Any:
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise CaptainError(f"invalid {source} {raw!r}", "use 1/0, true/false, yes/no or on/off")
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(raw)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise CaptainError(f"invalid {source} {raw!r}", f"choose one of: {allowed}") from None
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise CaptainError(f"invalid {source} {raw!r}", "expected a whole number") from None
    if kind is Path:
        return Path(raw).expanduser() if raw else None
    return raw


def load(env: Mapping[str, str] | None = None, flags: Mapping[str, str] | None = None,
         stages: Sequence[Option] = ()) -> Config:
    """Resolve the configuration from the environment and raw flag strings (flags win).
    stages: the stage options to read (the CLI passes the stage table's, pipeline.options());
    a stage option not given keeps its default."""
    env = os.environ if env is None else env
    values = {opt.name: value for opt in options() if (value := _read(opt, env, flags or {})) is not _UNSET}
    if values.get("kernel_src") is not None and values.get("kernel_source", KernelSource.AUTO) is KernelSource.AUTO:
        values["kernel_source"] = KernelSource.LOCAL
    given = {opt: value for opt in stages if (value := _read(opt, env, flags or {})) is not _UNSET}
    modes = {opt.stage: value for opt, value in given.items() if opt.kind is StageMode}
    forced = frozenset(opt.stage for opt, value in given.items() if opt.kind is bool and value)
    return Config(**values, modes=modes, forced=forced)


_UNSET = object()


def _read(opt: Option, env: Mapping[str, str], flags: Mapping[str, str]) -> Any:
    """The option's value from its flag, else its env var (an empty boolean one is unset), else
    _UNSET. A bad env var fails even when a flag overrides it."""
    value = _UNSET
    if opt.env in env and (env[opt.env] != "" or opt.kind is not bool):
        value = parse_value(opt, env[opt.env], opt.env)
    if opt.name in flags:
        value = parse_value(opt, flags[opt.name], opt.flag)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
