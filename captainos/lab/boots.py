"""Every VM boot a test run makes, and what it costs.

When CAPTAINOS_BOOT_LOG names a file, each `qemu.Guest` appends one JSON line to it when its
QEMU ends: the test that booted it (pytest's PYTEST_CURRENT_TEST), a label (the lab's or the
harness's VM directory), how it booted and how long QEMU ran. `python3 -m captainos.lab.boots
FILE` turns such a file into the table docs/benchmarks.md keeps ("VM boots in CI"): per test,
its boots, their seconds and what the test proves (its name).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENV = "CAPTAINOS_BOOT_LOG"


@dataclass(frozen=True)
class Boot:
    test: str  # pytest node id ("" outside pytest)
    label: str  # the VM's directory name ("" for a temporary one)
    kind: str  # kernel, netboot, cdrom or disk
    mem: str
    seconds: float


def current_test() -> str:
    """The node id of the running test, without pytest's phase ("(setup)", "(call)")."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


def record(boot: Boot, path: str | None = None) -> None:
    """Append one line for a finished boot when CAPTAINOS_BOOT_LOG (or path) is set. One
    write of a short line to a file opened for appending: VMs in threads never interleave."""
    target = path or os.environ.get(ENV, "")
    if not target:
        return
    line = json.dumps(boot.__dict__, sort_keys=True) + "\n"
    with open(target, "a", encoding="utf-8") as out:
        out.write(line)


def load(path: Path) -> list[Boot]:
    """The boots a log holds; a line cut short by a killed run is skipped."""
    boots = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            fields = json.loads(line)
            boots.append(Boot(**fields))
        except (ValueError, TypeError):
            continue
    return boots


def proves(test: str) -> str:
    """What a test proves, in its own words: its name without the test_ prefix and parameters."""
    name = test.rsplit("::", 1)[-1].split("[", 1)[0]
    return name.removeprefix("test_").replace("_", " ")


def table(boots: Iterable[Boot]) -> str:
    """A markdown table: one row per test, in the order the run booted them, with a total."""
    rows: dict[str, list[Boot]] = {}
    for boot in boots:
        rows.setdefault(boot.test, []).append(boot)
    lines = ["| test | boots | VM seconds | how | what it proves |", "| --- | ---: | ---: | --- | --- |"]
    for test, group in rows.items():
        kinds = ", ".join(sorted({f"{b.kind} {b.mem}" + (f" ({b.label})" if b.label else "") for b in group}))
        where = test.removeprefix("tests/") if test else "(no test)"
        lines.append(f"| `{where}` | {len(group)} | {sum(b.seconds for b in group):.0f} | {kinds} | {proves(test)} |")
    every = [boot for group in rows.values() for boot in group]
    lines.append(f"| total | {len(every)} | {sum(b.seconds for b in every):.0f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python3 -m captainos.lab.boots FILE  (a {ENV} file)", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"error: {path} does not exist (set {ENV}={path} for a test run first)", file=sys.stderr)
        return 2
    sys.stdout.write(table(load(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
