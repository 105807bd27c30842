"""The parameter table (params.tsv) against the README, the programs and units that read the
command line, and lib.sh's checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from captainos.core.errors import CaptainError
from captainos.stages import params

IMAGE = Path(__file__).resolve().parents[2] / "image"
LIB = IMAGE / "mkosi.extra/usr/lib/captainos/lib.sh"
# Everything in the image tree that reads the command line: programs, units, the generator.
SOURCES = [path for path in IMAGE.rglob("*") if path.is_file() and path.name != "params.tsv"
           and "mkosi.sandbox" not in path.parts and path.suffix not in (".conf", ".preset", ".toml", ".conflist")]
# How a name is read: lib.sh's accessors, or a unit's condition.
_READ = re.compile(r"\bcap_(?:param|param_or|refused)\s+\"?([A-Za-z_][A-Za-z0-9_.]*)\"?"
                   r"|ConditionKernelCommandLine=[|!]*([A-Za-z_][A-Za-z0-9_.]*)")
_DEFAULT = re.compile(r"\bcap_param_or\s+([A-Za-z_][A-Za-z0-9_.]*)\s+([0-9A-Za-z_]+)\b")
# Names the units test that are systemd's own (systemd-network-generator's), not ours.
SYSTEMD_OWN = {"ip", "nameserver", "rd.route", "rd.peerdns", "ifname", "net.ifname_policy", "vlan", "bond", "bridge"}


def _code(path: Path) -> str:
    """PATH without its comment lines (which name parameters as NAME, DEFAULT...)."""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


@pytest.fixture(scope="module")
def table() -> tuple[str, list[params.Param]]:
    return params.load()


def test_the_readme_table_is_made_from_the_parameter_table(table):
    version, rows = table
    readme = params.README.read_text()
    start, end = readme.index(params.BEGIN), readme.index(params.END) + len(params.END)
    assert readme[start:end] == params.readme_section(version, rows), \
        "run: python -m captainos.stages.params --readme README.md"


def test_every_name_a_program_or_unit_reads_is_in_the_table(table):
    _, rows = table
    known = {row.name for row in rows}
    read = {name for path in SOURCES for match in _READ.finditer(_code(path))
            for name in match.groups() if name}
    # Indirect reads ("$1", "$name") do not match the pattern; their callers' literals do.
    assert read - SYSTEMD_OWN - known == set()


def test_every_consumer_named_in_the_table_reads_that_parameter(table):
    _, rows = table
    by_name = {path.name: path for path in SOURCES}
    for row in rows:
        for consumer in row.consumers:
            if consumer == "kernel":
                continue
            assert consumer in by_name, f"{row.name}: no file {consumer} in the image tree"
            assert row.name in by_name[consumer].read_text(), f"{consumer} does not read {row.name}"


def test_a_default_written_in_a_program_is_the_tables(table):
    _, rows = table
    defaults = {row.name: row.default for row in rows}
    for path in SOURCES:
        for name, default in _DEFAULT.findall(_code(path)):
            assert defaults.get(name) == default, f"{path.name}: {name} defaults to {default}"


def test_every_kind_is_one_the_parse_checks(table):
    _, rows = table
    cases = LIB.read_text().split("_cap_check() {", 1)[1].split("esac", 1)[0]
    labels = {label.strip() for line in re.findall(r"^\s*([a-z_: |*,]+)\)", cases, re.MULTILINE)
              for label in line.split("|")}
    for row in rows:
        kind = "choice:*" if row.kind.startswith("choice:") else row.kind
        assert kind in labels, f"{row.name}: kind {row.kind} is not in lib.sh's _cap_check"


def test_only_credentials_are_secret_and_every_credential_is(table):
    _, rows = table
    assert {row.name for row in rows if row.secret} == {row.name for row in rows if row.kind == "credential"} \
        == {"registry_username", "registry_password"}


def test_the_init_environment_count_follows_the_table(table):
    _, rows = table
    env = {row.name for row in rows if row.init_env}
    assert "console" not in env and "initramfs_options" not in env  # Linux's own
    assert "captainos.restart_wait" not in env  # a dotted name stays with the kernel
    assert "captainos.test.syslog_restart" not in env and "tink_worker_image" in env
    assert len(env) <= params.DEBIAN_INIT_ENV_LIMIT


@pytest.mark.parametrize(("text", "error"), [
    ("# version 1.0\na\tb\tc\n", "3 tab-separated fields, expected 7"),
    ("# version 1.0\na\t-\tany\tmaybe\t-\t-\tdoc\n", "secret must be yes or no"),
    ("a\t-\tany\tno\t-\t-\tdoc\n", "no '# version N.M' line"),
])
def test_a_malformed_table_is_an_error_naming_its_line(tmp_path, text, error):
    path = tmp_path / "params.tsv"
    path.write_text(text)
    with pytest.raises(CaptainError, match=re.escape(error)):
        params.load(path)


def test_the_readme_is_rewritten_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{params.BEGIN}\nstale\n{params.END}\nafter\n")
    assert params.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "stale" not in text
    assert "| `tink_worker_image=<ref>` |" in text
    readme.write_text("no markers\n")
    with pytest.raises(CaptainError, match="no parameter section markers"):
        params.main(["--readme", str(readme)])
