"""The kernel command line parameters: the table the image's parse reads, seen from the build.

`image/mkosi.extra/usr/lib/captainos/params.tsv` is the one list of the parameters CaptainOS
reads: name, form, kind (the check lib.sh's parse applies), secret, default, consumers and one
line of doc. The boot's parse (the generator captainos-cmdline) holds every value to its kind
and leaves the secret ones out of what it saves; the README's parameter table is made here
from it (`python -m captainos.stages.params --readme README.md` rewrites it; a test holds the
two together), and so is the count of parameters Linux hands to /init as environment
variables, which Debian's kernel caps.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from captainos.core.config import REPO
from captainos.core.errors import CaptainError

TABLE = REPO / "image/mkosi.extra/usr/lib/captainos/params.tsv"
README = REPO / "README.md"
BEGIN = "<!-- parameters: made from params.tsv by `python -m captainos.stages.params --readme README.md` -->"
END = "<!-- parameters: end -->"
DEBIAN_INIT_ENV_LIMIT = 31  # CONFIG_INIT_ENV_ARG_LIMIT 32 takes 31 (tests/integration/test_kernel.py)
_VERSION = re.compile(r"^# version ([0-9]+\.[0-9]+)\b")
_COLUMNS = 7


@dataclass(frozen=True)
class Param:
    name: str
    form: str        # the value as the README shows it ("" for a bare word)
    kind: str        # the check the parse applies (lib.sh's _cap_check)
    secret: bool     # never logged, never in the saved parse
    default: str
    consumers: tuple[str, ...]  # the programs and units that read it ("kernel": Linux itself)
    doc: str

    @property
    def init_env(self) -> bool:
        """Linux hands a parameter it does not know, with a "=" and no "." in its name, to /init
        as an environment variable."""
        return "." not in self.name and "kernel" not in self.consumers and bool(self.form)


def _field(value: str) -> str:
    return "" if value == "-" else value


def load(path: Path = TABLE) -> tuple[str, list[Param]]:
    """The table's version and its rows; a malformed row is an error naming its line."""
    version = ""
    rows: list[Param] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if match := _VERSION.match(line):
            version = match.group(1)
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) != _COLUMNS:
            raise CaptainError(f"{path}:{number}: {len(cells)} tab-separated fields, expected {_COLUMNS}")
        name, form, kind, secret, default, consumers, doc = (_field(cell) for cell in cells)
        if secret not in ("yes", "no"):
            raise CaptainError(f"{path}:{number}: secret must be yes or no, not {secret!r}")
        rows.append(Param(name, form, kind, secret == "yes", default, tuple(consumers.split()), doc))
    if not version:
        raise CaptainError(f"{path}: no '# version N.M' line")
    return version, rows


def readme_section(version: str, params: list[Param]) -> str:
    """The README's parameter table and the facts computed from it, between the markers."""
    lines = [BEGIN, "", f"Parameter table version {version}.", "",
             "| parameter | default | effect |", "| --- | --- | --- |"]
    for param in params:
        word = f"{param.name}={param.form}" if param.form else param.name
        lines.append(f"| `{_cell(word)}` | {_cell(param.default)} | {_cell(param.doc)} |")
    env = [param.name for param in params if param.init_env]
    lines += ["", f"{len(env)} of these reach `/init` as environment variables (a `=` and no `.` in the name, "
              f"unknown to Linux); Debian's kernel takes {DEBIAN_INIT_ENV_LIMIT} (see \"How many parameters\").",
              "", END]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar would end the table's cell


def replace_section(text: str, section: str) -> str:
    """TEXT with its generated section replaced by SECTION."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise CaptainError("the README has no parameter section markers", f"add the lines {BEGIN!r} and {END!r}")
    return text[:start] + section + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captainos.stages.params",
                                     description="Write the README's parameter table from params.tsv.")
    parser.add_argument("--readme", type=Path, default=README, help="the README to rewrite in place")
    args = parser.parse_args(argv)
    version, params = load()
    text = args.readme.read_text()
    new = replace_section(text, readme_section(version, params))
    if new != text:
        tmp = args.readme.with_suffix(".tmp")
        tmp.write_text(new)
        tmp.replace(args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
