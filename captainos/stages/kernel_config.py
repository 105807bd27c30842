"""The kernel's configuration: the fragments in kernel/configs/<series>/ merged over
`make allnoconfig` and checked after olddefconfig, the options CaptainOS needs
(kernel/required.txt), and the module set kept from Debian's prebuilt kernel
(kernel/debian-modules.txt plus its modules.dep closure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from captainos.core.config import REPO, Arch
from captainos.core.errors import CaptainError

KERNEL_DIR = REPO / "kernel"
CONFIG_ROOT = KERNEL_DIR / "configs"
REQUIRED = KERNEL_DIR / "required.txt"
DEBIAN_MODULES = KERNEL_DIR / "debian-modules.txt"


# --- fragments and the resolved .config --------------------------------------------------

def available_series(arch: Arch) -> list[str]:
    found = [d.name for d in CONFIG_ROOT.iterdir() if (d / f"{arch.value}.config").is_file()] \
        if CONFIG_ROOT.is_dir() else []
    return sorted(found, key=lambda s: tuple(int(p) for p in s.split(".")))


def config_fragments(kseries: str, arch: Arch, root: Path = CONFIG_ROOT) -> list[Path]:
    """common.config (when present) then <arch>.config of one series, or a clear error."""
    arch_file = root / kseries / f"{arch.value}.config"
    if not arch_file.is_file():
        have = ", ".join(available_series(arch)) if root == CONFIG_ROOT else "?"
        raise CaptainError(f"no config for {kseries} on {arch.value}; available: {have or 'none'}",
                           f"add {arch_file.relative_to(REPO) if root == CONFIG_ROOT else arch_file}")
    common = root / kseries / "common.config"
    return ([common] if common.is_file() else []) + [arch_file]


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('y', 'm', '"str"', '123'); '# CONFIG_X is not set' -> 'n'."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"^(CONFIG_\w+)=(.*)$", line):
            values[m[1]] = m[2]
        elif m := re.match(r"^# (CONFIG_\w+) is not set$", line):
            values[m[1]] = "n"
    return values


def merge_fragments(paths: Sequence[Path]) -> str:
    """The fragments concatenated, later files winning (Kconfig reads the last value)."""
    return "".join(f"# --- {p.parent.name}/{p.name}\n{p.read_text()}\n" for p in paths)


def fragment_mismatches(fragment: str, resolved: dict[str, str]) -> list[str]:
    """Options the fragment sets that the resolved .config does not have (a missing dependency
    or a misspelt name). '=m' resolved as 'y' is fine: something built in selected it."""
    wanted = parse_config(fragment)
    out = []
    for option, value in wanted.items():
        got = resolved.get(option, "n")
        if got != value and not (value == "m" and got == "y"):
            out.append(f"{option}={value} (got {got})")
    return out


# --- required options and module sets ----------------------------------------------------

@dataclass(frozen=True)
class Requirement:
    option: str
    module: str | None  # the module that provides it when =m is acceptable


def read_required(path: Path = REQUIRED) -> list[Requirement]:
    """Lines 'CONFIG_X [module]'; '#' starts a comment."""
    reqs = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        words = raw.split("#")[0].split()
        if not words:
            continue
        if not re.match(r"^CONFIG_\w+$", words[0]) or len(words) > 2:
            raise CaptainError(f"{path}:{number}: expected 'CONFIG_NAME [module]', got {raw.strip()!r}")
        reqs.append(Requirement(words[0], words[1] if len(words) > 1 else None))
    return reqs


def module_name(path: str) -> str:
    """kernel/fs/overlayfs/overlay.ko.xz -> overlay; dashes and underscores are the same name."""
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", path.rsplit("/", 1)[-1]).replace("-", "_")


def missing_options(reqs: Iterable[Requirement], resolved: dict[str, str],
                    modules: set[str] | None = None) -> list[str]:
    """Requirements the config does not meet; '=m' counts only when the module is in `modules`."""
    out = []
    for req in reqs:
        value = resolved.get(req.option, "n")
        if value == "y":
            continue
        if value == "m" and modules is not None and req.module and module_name(req.module) in modules:
            continue
        why = f"=m but module {req.module or '?'} is not kept" if value == "m" else "not set"
        out.append(f"{req.option} ({why})")
    return out


def check_required(config: Path, modules: set[str] | None = None, required: Path = REQUIRED) -> None:
    missing = missing_options(read_required(required), parse_config(config.read_text()), modules)
    if missing:
        raise CaptainError(f"kernel config {config} lacks options CaptainOS needs: {', '.join(missing)}",
                           f"enable them in kernel/configs (or kernel/debian-modules.txt); list: {required}")


def read_module_list(arch: Arch, path: Path = DEBIAN_MODULES) -> list[str]:
    """Module names of the list; a line starting with '<arch>:' counts for that arch only."""
    names = []
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if words and words[0].endswith(":"):
            if words[0][:-1] not in {a.value for a in Arch}:
                raise CaptainError(f"{path}: unknown architecture {words[0]!r}", "use amd64: or arm64:")
            if words[0][:-1] != arch.value:
                continue
            words = words[1:]
        names += [module_name(w) for w in words]
    return names


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, [dependency paths]) from modules.dep."""
    out = {}
    for line in text.splitlines():
        if ":" in line:
            path, _, deps = line.partition(":")
            out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """name -> soft dependency names (pre: and post:) from modules.softdep."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            out.setdefault(module_name(words[1]), []).extend(
                module_name(w) for w in words[2:] if w not in ("pre:", "post:"))
    return out


def module_closure(names: Iterable[str], modules_dep: str, softdep: str = "",
                   builtin: Iterable[str] = ()) -> list[str]:
    """Paths (relative to lib/modules/<kver>) of the named modules and everything they need.

    Built-in names are satisfied already; a name that is neither a module nor built in is an
    error. Soft dependencies are followed when they exist as modules.
    """
    deps = parse_modules_dep(modules_dep)
    soft = parse_softdeps(softdep)
    inside = {module_name(b) for b in builtin}
    unknown = sorted({module_name(n) for n in names} - deps.keys() - inside)
    if unknown:
        raise CaptainError(f"modules neither built nor built in: {', '.join(unknown)}",
                           f"fix {DEBIAN_MODULES.relative_to(REPO)}")
    keep: set[str] = set()
    todo = [module_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in keep or name not in deps:
            continue
        keep.add(name)
        todo.extend(module_name(p) for p in deps[name][1])
        todo.extend(s for s in soft.get(name, []) if s in deps)
    return sorted(deps[n][0] for n in keep)
