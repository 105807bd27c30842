"""lib.sh: command line parsing, JSON logging and the validators every program shares."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.image.conftest import Sandbox



def params(sandbox: Sandbox, cmdline: str) -> dict[str, str]:
    sandbox.cmdline(cmdline)
    result = sandbox.bash('cap_cmdline_load\n'
                          'for k in "${!CAP_PARAMS[@]}"; do printf "%s\\t%s\\n" "$k" "${CAP_PARAMS[$k]}"; done')
    assert result.returncode == 0, result.stderr
    return dict(line.split("\t", 1) for line in result.stdout.splitlines())


def test_values_split_on_the_first_equals_sign(sandbox):
    got = params(sandbox, "console=ttyS0,115200 grpc_authority=10.0.0.1:42113 token=a=b==\n")
    assert got["token"] == "a=b=="
    assert got["console"] == "ttyS0,115200"


def test_trailing_newline_is_not_part_of_the_last_value(sandbox):
    assert params(sandbox, "worker_id=de:ad:be:ef:00:01\n")["worker_id"] == "de:ad:be:ef:00:01"


def test_quotes_group_blanks_and_are_dropped(sandbox):
    got = params(sandbox, 'a="x y" "b=1 2" quiet')
    assert got == {"a": "x y", "b": "1 2", "quiet": ""}


def test_last_occurrence_wins_and_empty_values_are_kept(sandbox):
    got = params(sandbox, "console=tty0 console=ttyS1 operator_note=")
    assert got == {"console": "ttyS1", "operator_note": ""}


def model_parse(text: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The rules cap_cmdline_parse implements, a character at a time: words split on blanks
    outside double quotes, quotes dropped from the value (kept in the raw word), each word
    split on its first "=" (a word naming nothing is skipped), the last occurrence wins,
    trailing newlines ignored; a word holding a control character (a tab or newline inside
    quotes) is refused and drops the earlier value of its name."""
    values: dict[str, str] = {}
    raws: dict[str, str] = {}
    consoles: list[str] = []
    words: list[tuple[str, str]] = []
    word = raw = ""
    quoted = False
    for c in text.rstrip("\n"):
        if c == '"':
            quoted = not quoted
            raw += c
        elif not quoted and c in " \t\n":
            words.append((word, raw))
            word = raw = ""
        else:
            word += c
            raw += c
    words.append((word, raw))
    for word, raw in words:
        name = word.split("=", 1)[0]
        if not name:  # "=x" names nothing
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in word):
            values.pop(name, None)
            raws.pop(name, None)
            continue
        values[name] = word.split("=", 1)[1] if "=" in word else ""
        raws[name] = raw
        if name == "console" and "=" in word:
            consoles.append(word.split("=", 1)[1])
    return values, raws, consoles


def test_the_parse_matches_the_kernel_word_rules_on_random_command_lines(sandbox):
    """Random lines of names, values, blanks, quotes (unterminated ones too) and non-ASCII
    bytes, parsed in one bash run, against model_parse."""
    import random

    rng = random.Random(17)
    alphabet = ["a", "b", "console", "x", "=", "=", '"', '"', " ", " ", "\t", "\n", ",", ".", ":", "é", "\\", "*"]
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(150)]
    lines += ['=x a=1', 'a="x y', 'a="" b', '"" x=1', 'console="a b" console=c', "p=1\n\n\n", ' \t lead=1 ']
    script = []
    for number, line in enumerate(lines):
        (sandbox.tmp / f"cmdline{number}").write_text(line)
        script.append(f'CMDLINE_FILE="{sandbox.tmp}/cmdline{number}"; cap_cmdline_parse\n'
                      f'for k in "${{!CAP_PARAMS[@]}}"; do\n'
                      f'printf "{number}\\1V\\1%s\\1%s\\0" "$k" "${{CAP_PARAMS[$k]}}"; '
                      f'printf "{number}\\1R\\1%s\\1%s\\0" "$k" "${{CAP_RAW[$k]}}"; done\n'
                      f'for c in "${{CAP_CONSOLES[@]}}"; do printf "{number}\\1C\\1%s\\0" "$c"; done')
    result = sandbox.bash("CAP_PARSE_QUIET=1\n" + "\n".join(script), timeout=120)
    assert result.returncode == 0, result.stderr
    got: dict[int, tuple[dict[str, str], dict[str, str], list[str]]] = {n: ({}, {}, []) for n in range(len(lines))}
    for record in result.stdout.split("\0")[:-1]:
        number, kind, rest = record.split("\x01", 2)
        values, raws, consoles = got[int(number)]
        if kind == "C":
            consoles.append(rest)
        else:
            key, value = rest.split("\x01", 1)
            (values if kind == "V" else raws)[key] = value
    for number, line in enumerate(lines):
        assert got[number] == model_parse(line), repr(line)


def test_a_control_character_inside_a_value_refuses_that_parameter_alone(sandbox):
    """A newline inside quotes would be a second line in authorized_keys, or crash the network
    setup; a raw control byte is no part of any value. Each such word is one error line."""
    sandbox.cmdline_file.write_bytes(b'ipam=de-ad-be-ef-fe-ed::10.0.0.9:24 ipam="de-ad-be-ef-fe-ed::10.0.0.9:24\nx" '
                                     b'ssh_authorized_keys="ssh-ed25519 AAAA c\nrestrict,command=\\"x\\" junk" '
                                     b'syslog_host=h\x01x worker_id="a\tb" interface=eth1 grpc_authority=t:1\n')
    result = sandbox.bash('cap_cmdline_load\nfor k in "${!CAP_PARAMS[@]}"; do echo "$k=${CAP_PARAMS[$k]}"; done | sort')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["grpc_authority=t:1", "interface=eth1"]
    errors = [json.loads(line) for line in result.stderr.splitlines()]
    assert sorted(e["param"] for e in errors) == ["ipam", "ssh_authorized_keys", "syslog_host", "worker_id"]
    assert {e["msg"] for e in errors} == {"refusing a parameter: its value holds a control character "
                                          "(a newline inside quotes?)"}


def test_log_lines_stay_json_with_bytes_that_are_not_utf8(sandbox):
    """A value with bytes that are not UTF-8 (from the command line, DHCP, a tool's error) still
    makes a line every JSON parser reads: those bytes become "?", valid UTF-8 stays as it is."""
    result = sandbox.bash(r"""cap_error m a="$(printf 'ok\xc3\xa9 bad\xff end')" """
                          r"""b="$(printf 'caf\xc3\xa9 \xe2\x82\xac')" c="$(printf '\xc0\xaf')" """
                          r"""d="$(printf '\xed\xa0\x80')" 2>"$HOME/log" """)
    assert result.returncode == 0, result.stderr
    entry = json.loads((sandbox.tmp / "log").read_bytes().decode("utf-8"))  # strict: any bad byte raises
    assert (entry["a"], entry["b"], entry["c"], entry["d"]) == ("ok?? bad? end", "café €", "??", "???")


def test_cap_param_distinguishes_absent_from_empty(sandbox):
    sandbox.cmdline("empty=")
    result = sandbox.bash('cap_cmdline_load\ncap_param empty && echo "empty:yes"\n'
                          'cap_param missing || echo "missing:no"')
    assert result.stdout.split() == ["empty:yes", "missing:no"]


GENERATOR = (Path(__file__).resolve().parents[2] / "image/mkosi.extra/usr/lib/systemd/system-generators"
             / "captainos-cmdline")
TABLE = Path(__file__).resolve().parents[2] / "image/mkosi.extra/usr/lib/captainos/params.tsv"
HOSTILE = ('console=tty0 console=ttyS1,115200 a="x y" token=a=b== quiet empty= '
           "q='single' d=$(touch${IFS}/tmp/pwned) b=`id` s=a\\b g=[b]in star=* nl=end\n")


def _dump(sandbox: Sandbox) -> str:
    result = sandbox.bash('cap_cmdline_load\nfor k in "${!CAP_PARAMS[@]}"; do printf "%s=%s|%s\\n" "$k" '
                          '"${CAP_PARAMS[$k]}" "${CAP_RAW[$k]}"; done | sort\nprintf "consoles %s\\n" '
                          '"${CAP_CONSOLES[*]}"')
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_generator_parses_once_and_every_program_loads_the_same_values(sandbox):
    sandbox.cmdline(HOSTILE)
    parsed_by_each = _dump(sandbox)
    result = sandbox.run(GENERATOR)
    assert result.returncode == 0, result.stderr
    saved = sandbox.root / "run/captainos/cmdline.parsed"
    assert saved.stat().st_mode & 0o777 == 0o600  # it may hold a registry password
    sandbox.cmdline("changed=1")  # the programs now read the boot's parse, not the file
    assert _dump(sandbox) == parsed_by_each
    assert "consoles tty0 ttyS1,115200" in parsed_by_each and "d=$(touch${IFS}/tmp/pwned)|" in parsed_by_each
    assert not Path("/tmp/pwned").exists()


def test_the_boot_parse_leaves_the_registry_credentials_out(sandbox):
    sandbox.cmdline("docker_registry=reg.local registry_username=admin registry_password=s3cret-pw x=1")
    assert sandbox.run(GENERATOR).returncode == 0
    saved = (sandbox.root / "run/captainos/cmdline.parsed").read_text()
    assert "s3cret-pw" not in saved and "admin" not in saved and "reg.local" in saved
    result = sandbox.bash('cap_cmdline_load\ncap_param registry_password || echo absent\n'
                          'cap_secrets_load\ncap_param registry_password')
    assert result.stdout.split() == ["absent", "s3cret-pw"], result.stderr


def test_a_broken_boot_parse_falls_back_and_a_failed_reparse_loses_nothing(sandbox):
    sandbox.cmdline("worker_id=one HTTP_PROXY=http://p.local:3128")
    parsed = sandbox.root / "run/captainos/cmdline.parsed"
    parsed.parent.mkdir(parents=True)
    parsed.write_text("declare -gA CAP_PARAMS=( [worker_id]=\"one\" \nthis is not bash (\n")
    result = sandbox.bash('cap_cmdline_load\ncap_param worker_id\necho\n'
                          'CMDLINE_FILE=/nonexistent; cap_secrets_load || echo failed\ncap_param HTTP_PROXY')
    assert result.stdout.split() == ["one", "failed", "http://p.local:3128"], result.stderr


def test_without_the_boot_parse_a_program_parses_the_command_line_itself(sandbox):
    sandbox.cmdline("worker_id=one")
    assert "worker_id=one|worker_id=one" in _dump(sandbox)
    assert not (sandbox.root / "run/captainos/cmdline.parsed").exists()


def test_log_lines_are_one_json_object_each_even_with_hostile_text(sandbox):
    result = sandbox.bash("""cap_error 'bad "value"\\ here'"$(printf '\\n\\t\\x01')" param=x 'value=a"b\\c'""")
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "error"
    assert entry["msg"].startswith('bad "value"\\ here\n\t')
    assert entry["value"] == 'a"b\\c'


@pytest.mark.parametrize(("mask", "prefix"), [("255.255.255.0", "24"), ("255.255.252.0", "22"), ("24", "24"),
                                              ("/16", "16"), ("0.0.0.0", "0"), ("255.255.255.255", "32"),
                                              ("08", "8"), ("024", "24"), ("/09", "9"), ("00", "0")])
def test_netmask_prefix_accepts_dotted_and_prefix_length(sandbox, mask, prefix):
    result = sandbox.bash(f"cap_netmask_prefix '{mask}'")
    assert (result.returncode, result.stdout) == (0, prefix)


@pytest.mark.parametrize("mask", ["255.0.255.0", "33", "255.255.255", "abc", "", "255.255.255.256", "033", "0024",
                                  "255.255.255.000"])
def test_netmask_prefix_rejects_nonsense(sandbox, mask):
    assert sandbox.bash(f"cap_netmask_prefix '{mask}'").returncode != 0


@pytest.mark.parametrize(("check", "value", "ok"), [
    ("cap_is_vlan", "1", True), ("cap_is_vlan", "4094", True), ("cap_is_vlan", "0", False),
    ("cap_is_vlan", "4095", False), ("cap_is_vlan", "5000", False), ("cap_is_vlan", "1a", False),
    ("cap_is_mac", "de-ad-be-ef-fe-ed", True), ("cap_is_mac", "DE:AD:BE:EF:FE:ED", True),
    ("cap_is_mac", "de:ad:be:ef:fe", False), ("cap_is_ipv4", "10.0.0.1", True),
    ("cap_is_ipv4", "10.0.0.256", False), ("cap_is_ipv4", "010.0.0.1", False), ("cap_is_ipv4", "1.2.3", False),
    ("cap_is_hostport", "registry.local:5000", True), ("cap_is_hostport", "10.1.1.1", True),
    ("cap_is_hostport", "[fd00::1]:5000", True), ("cap_is_hostport", "reg:99999", False),
    ("cap_is_hostport", "a b", False), ("cap_is_hostport", "reg:", False),
    ("cap_is_image_ref", "10.0.2.2:5000/tink-agent:v1", True),
    ("cap_is_image_ref", "ghcr.io/tinkerbell/tink-agent@sha256:abc", True),
    ("cap_is_image_ref", "reg/tink agent:latest", False), ("cap_is_image_ref", "-rm", False),
    ("cap_is_image_ref", "reg//x", False), ("cap_is_hostname", "my-server.example", True),
    ("cap_is_hostname", "-bad", False), ("cap_is_hostname", "a..b", False),
    # IPv6 as RFC 4291 writes it (and the brackets of a host:port, an image's registry, a URL).
    ("cap_is_ipv6", "fd77::1", True), ("cap_is_ipv6", "::1", True), ("cap_is_ipv6", "::", True),
    ("cap_is_ipv6", "2001:db8:0:0:0:0:0:1", True), ("cap_is_ipv6", "fe80::", True),
    ("cap_is_ipv6", "::ffff:10.0.0.1", True), ("cap_is_ipv6", "::10.0.0.1", True),
    ("cap_is_ipv6", "1:2:3:4:5:6:7:8:9", False), ("cap_is_ipv6", "1:2:3:4:5:6:7", False),
    ("cap_is_ipv6", "1::2::3", False), ("cap_is_ipv6", "fd77:::1", False), ("cap_is_ipv6", "12345::1", False),
    ("cap_is_ipv6", "g::1", False), ("cap_is_ipv6", ":1:2:3:4:5:6:7", False), ("cap_is_ipv6", "10.0.0.1", False),
    ("cap_is_ipv6", "::ffff:10.0.0.256", False), ("cap_is_ipv6", "1:2:3:4:5:6:7::8", False),
    ("cap_is_ipv6", "fd77::1%eth0", False), ("cap_is_ipv6", "1:2:3:4:5:6:7:", False),
    ("cap_is_hostport", "[fd77::1]", True), ("cap_is_hostport", "[fd77::1]:42113", True),
    ("cap_is_hostport", "[fd77::x]:1", False), ("cap_is_hostport", "[1:2]:80", False),
    ("cap_is_image_ref", "[fd77::1]:5000/tink-agent:v0.25.0", True),
    ("cap_is_image_ref", "[fd77::1]/tink-agent", True), ("cap_is_image_ref", "[fd77::1]:5000/", False),
    ("cap_is_image_ref", "[fd77::z]:5000/a", False), ("cap_is_image_ref", "a/[fd77::1]", False),
    ("cap_is_mirror_url", "https://[fd77::1]:5000", True), ("cap_is_mirror_url", "https://[fd77::1]:x", False),
    ("cap_is_mirror_url", "https://mirror.local/v2", True),
    # Proxy URLs as Go's url.Parse (http.ProxyFromEnvironment) takes them; what it refuses, we do.
    ("cap_is_proxy", "http://proxy.local:3128", True), ("cap_is_proxy", "http://proxy.local:3128/", True),
    ("cap_is_proxy", "https://u:p@proxy:3128", True), ("cap_is_proxy", "http://user:pa%41@proxy:3128", True),
    ("cap_is_proxy", "http://u@v:w@proxy:1", True), ("cap_is_proxy", "socks5://10.0.0.1:1080", True),
    ("cap_is_proxy", "http://[fd00::1]:3128", True), ("cap_is_proxy", "http://user:pa%zz@proxy:3128", False),
    ("cap_is_proxy", "http://user:pa%4@proxy:3128", False), ("cap_is_proxy", "http://pass<w@proxy:3128", False),
    ("cap_is_proxy", "http://proxy:99999", False), ("cap_is_proxy", "http://pro xy:1", False),
    ("cap_is_proxy", "ftp://proxy:21", False), ("cap_is_proxy", "http://proxy:3128/path", False),
    ("cap_is_proxy", "http://:3128", False), ("cap_is_proxy", "http://u:p@:3128", False),
])
def test_validators(sandbox, check, value, ok):
    assert (sandbox.bash(f"{check} '{value}'").returncode == 0) is ok


@pytest.mark.parametrize(("ref", "registry"), [("10.0.2.2:5000/tink-agent:v1", "10.0.2.2:5000"),
                                               ("ghcr.io/tinkerbell/tink-agent:v0.25.0", "ghcr.io"),
                                               ("localhost/agent", "localhost"), ("tinkerbell/agent", "docker.io"),
                                               ("agent", "docker.io"),
                                               ("[fd77::1]:5000/tink-agent", "[fd77::1]:5000")])
def test_image_registry_follows_containerd_rules(sandbox, ref, registry):
    assert sandbox.bash(f"cap_image_registry '{ref}'").stdout == registry


def test_write_file_creates_the_mode_before_the_content(sandbox):
    result = sandbox.bash('printf secret | cap_write_file "$ROOT/run/x/secret" 0600; stat -c %a "$ROOT/run/x/secret"')
    assert result.stdout.strip() == "600"
    assert (sandbox.root / "run/x/secret").read_text() == "secret"


# Values are matched as text, never expanded against the file system (the programs run in "/").
@pytest.mark.parametrize(("check", "value"), [("cap_is_hostname", "[b]in"), ("cap_is_hostname", "[e]tc.[u]sr"),
                                              ("cap_is_hostname", "*"), ("cap_is_hostport", "[p]roc:80"),
                                              ("cap_is_hostport", "sys/*/*/*/*/*/*/*/*"),
                                              ("cap_is_machine_hostname", "[b]in")])
def test_glob_characters_are_refused_quickly(sandbox, check, value):
    result = sandbox.bash(f"{check} '{value}'", timeout=5)
    assert result.returncode != 0


def test_programs_never_expand_globs(sandbox):
    result = sandbox.bash('list="*"; for x in $list; do printf "%s\\n" "$x"; done')
    assert result.stdout.splitlines() == ["*"]


@pytest.mark.parametrize(("value", "ok"), [("a" * 30 + "." + "b" * 33, True), ("a" * 30 + "." + "b" * 34, False),
                                           ("node-1.example", True), ("x." * 31 + "yz", True),
                                           ("x." * 32 + "y", False), ("-a", False)])
def test_machine_hostname_fits_the_kernel(sandbox, value, ok):
    # The kernel keeps at most 64 bytes of a host name and cuts the rest silently.
    assert (sandbox.bash(f"cap_is_machine_hostname '{value}'").returncode == 0) is ok


@pytest.mark.parametrize(("cmdline", "verbatim"), [
    ("token=plain", True), ('token="with space"', True),
    ('"token=with space"', True), ("quiet", True),
    ('token=pa"ss', False), ('token="a"b"', False), ('token=ab"', False),
    ('token="x" other=1', True), ('token=a"b c"d', False),
])
def test_a_value_with_a_quote_inside_is_not_verbatim(sandbox, cmdline, verbatim):
    sandbox.cmdline(cmdline)
    name = "quiet" if cmdline == "quiet" else "token"
    result = sandbox.bash(f"cap_cmdline_load\ncap_param_verbatim {name}")
    assert (result.returncode == 0) is verbatim


@pytest.mark.parametrize(("cmdline", "refused"), [
    ('registry_password="with space"', False), ('registry_password=s3cr"et', True),
    ('registry_password=s3"cr e"t', True),
])
def test_a_credential_that_is_not_verbatim_is_refused_by_the_parse_without_its_value(sandbox, cmdline, refused):
    sandbox.cmdline(cmdline)
    result = sandbox.bash("cap_cmdline_load\ncap_refused registry_password && ! cap_param registry_password")
    assert (result.returncode == 0) is refused
    assert "s3" not in result.stderr  # the name only


def _gettys_told_to_wait(sandbox: Sandbox, active: str | None) -> list[str]:
    """Run the generator with this /sys/class/tty/console/active; the gettys it defers."""
    if active is not None:
        path = sandbox.root / "sys/class/tty/console/active"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(active + "\n")
    out = sandbox.root / "run/systemd/generator"
    out.mkdir(parents=True)
    result = sandbox.run(GENERATOR, str(out), str(out) + ".early", str(out) + ".late")
    assert result.returncode == 0, result.stderr
    drop_ins = sorted(out.glob("*.service.d/captainos-wait.conf"))
    assert all(p.read_text() == "[Service]\nEnvironment=CAPTAINOS_GETTY_WAIT=1\n" for p in drop_ins)
    return [p.parent.name.removesuffix(".d") for p in drop_ins]


@pytest.mark.parametrize(("active", "waiting"), [
    ("tty0 ttyS1", ["getty@tty1.service"]),  # Smee's netboot set: ttyS1 is /dev/console
    ("ttyS1 tty0", ["serial-getty@ttyS1.service"]),  # the VT is /dev/console
    ("tty0 ttyS0 ttyS1", ["getty@tty1.service", "serial-getty@ttyS0.service"]),
    ("ttyS0", ["getty@tty1.service"]),  # the harness's console= only
    ("tty1", []),
    ("", []),
    (None, []),  # no sysfs: every console at once, as before
])
def test_only_dev_console_gets_its_shell_at_once(sandbox, active, waiting):
    sandbox.cmdline("quiet")
    assert _gettys_told_to_wait(sandbox, active) == waiting


def _getty_on_enter(tmp_path: Path, wait: bool, typed: bytes) -> subprocess.CompletedProcess[bytes]:
    program = GENERATOR.parents[2] / "captainos/getty-on-enter"
    env = {"PATH": "/usr/bin:/bin", **({"CAPTAINOS_GETTY_WAIT": "1"} if wait else {})}
    return subprocess.run([str(program), "echo", "agetty", "started"], input=typed, env=env,
                          capture_output=True, timeout=10, check=False)


def test_getty_on_enter_starts_the_getty_at_once_unless_told_to_wait(tmp_path):
    at_once = _getty_on_enter(tmp_path, wait=False, typed=b"")
    assert (at_once.returncode, at_once.stdout) == (0, b"agetty started\n")
    waited = _getty_on_enter(tmp_path, wait=True, typed=b"\n")
    assert waited.returncode == 0 and waited.stdout.endswith(b"press Enter for a root shell on this console.\n"
                                                             b"agetty started\n"), waited.stdout
    nobody = _getty_on_enter(tmp_path, wait=True, typed=b"")  # end of input: no getty
    assert nobody.returncode != 0 and b"agetty started" not in nobody.stdout


# --- the parameter table (params.tsv): the parse holds every value to its kind --------------

# For each kind of params.tsv: a parameter of that kind, a value the parse takes and one it refuses.
KIND_EXAMPLES = {
    "image_ref": ("tink_worker_image", "reg.local:5000/agent:1", "reg.local//agent"),
    "hostport": ("docker_registry", "[fd77::1]:5000", "reg.local:99999"),
    "authority": ("grpc_authority", "tink.lab:42113", "tink.lab"),
    "credential": ("registry_password", '"two words"', 'pa"ss'),
    "bool": ("tinkerbell_tls", "True", "enabled"),
    "proxy": ("HTTP_PROXY", "http://u:p%20w@proxy:3128", "http://user:pa%zz@proxy:3128"),
    "host": ("syslog_host", "fd77::1", "bad_host!"),
    "port": ("syslog_port", "0514", "65536"),
    "ifname": ("interface", "eth0.42", "a-name-longer-than-15"),
    "mac": ("hw_addr", "52-54-00-12-34-56", "52:54:00:12:34"),
    "vlan": ("vlan_id", "0042", "4095"),
    "ipam": ("ipam", "de-ad-be-ef-fe-ed::10.0.0.2:24:::::", "de-ad-be-ef-fe-ed::10.0.0.2:24::::"),
    "id": ("worker_id", "de:ad:be:ef:fe:ed", '"a b"'),
    "seconds": ("captainos.restart_wait", "08", "-1"),
    "counts": ("captainos.test.hardware", "08,1", "2;1"),
    "choice:on,off": ("captainos.zram", "off", "no"),
    "choice:off,nopoweroff": ("captainos.selftest", "nopoweroff", "of"),
}
UNCHECKED_KINDS = {"any", "list", "kernel"}  # taken as written; lists are checked entry by entry


def test_every_kind_of_the_table_has_examples_here():
    kinds = {line.split("\t")[2] for line in TABLE.read_text().splitlines() if line and not line.startswith("#")}
    assert kinds - UNCHECKED_KINDS == set(KIND_EXAMPLES)



@pytest.mark.parametrize(("name", "written", "read"), [
    ("syslog_port", "0514", "514"), ("captainos.restart_wait", "08", "8"), ("captainos.restart_wait", "0", "0"),
    ("vlan_id", "0042", "42"), ("captainos.test.hardware", "08,010", "8,10"),
])
def test_the_parse_reads_numbers_in_base_10_once_for_every_reader(sandbox, name, written, read):
    """Bash arithmetic takes a leading zero for octal ("08" is an error): the parse keeps a
    number without them, so no reader has to remember."""
    sandbox.cmdline(f"{name}={written}")
    result = sandbox.bash(f"cap_cmdline_load\ncap_param {name}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == read

@pytest.mark.parametrize("kind", sorted(KIND_EXAMPLES))
def test_the_parse_takes_a_good_value_and_refuses_a_bad_one_by_its_kind(sandbox, kind):
    name, good, bad = KIND_EXAMPLES[kind]
    sandbox.cmdline(f"{name}={good}")
    assert sandbox.bash(f"cap_cmdline_load\n! cap_refused {name} && cap_param {name} >/dev/null").returncode == 0
    sandbox.cmdline(f"other=1 {name}={bad}")
    result = sandbox.bash(f"cap_cmdline_load\ncap_refused {name} && ! cap_param {name} && cap_param other")
    assert result.returncode == 0, result.stderr
    [error] = result.messages("error")
    assert error.startswith("refusing a parameter: ")


def test_the_generator_saves_refusals_and_says_each_on_the_console(sandbox):
    sandbox.cmdline("tinkerbell_tls=enabled vlan_id=0 registry_password=s3cr\"e\"t syslog_host=logs.lab")
    out = sandbox.root / "run/systemd/generator"
    out.mkdir(parents=True)
    result = sandbox.run(GENERATOR, str(out))
    assert result.returncode == 0, result.stderr
    console = (sandbox.tmp / "console").read_text().splitlines()
    assert sorted(console) == ["captainos: captainos-cmdline: refusing registry_password: a double quote inside "
                               "does not survive the kernel command line",
                               "captainos: captainos-cmdline: refusing tinkerbell_tls: not a boolean "
                               "(true/false, 1/0, t/f, yes/no, on/off)",
                               "captainos: captainos-cmdline: refusing vlan_id: not a VLAN id (1-4094)"]
    saved = (sandbox.root / "run/captainos/cmdline.parsed").read_text()
    assert "s3cr" not in saved and "s3cr" not in result.stderr  # no secret's value, refused or not
    # Each program loads the saved parse: the refusals, not the values, and no second error line.
    result = sandbox.bash("cap_cmdline_load\ncap_refused tinkerbell_tls && cap_refused vlan_id && "
                          "cap_refused registry_password && ! cap_param vlan_id && cap_param syslog_host")
    assert result.returncode == 0 and result.messages("error") == []


def test_the_generators_log_lines_go_to_the_kernels_log_when_it_can_write_there(sandbox):
    # A generator's stderr goes nowhere; /dev/kmsg is where journald finds its lines.
    kmsg = sandbox.tmp / "kmsg"
    kmsg.write_text("")
    sandbox.cmdline("vlan_id=0 quiet")
    out = sandbox.root / "run/systemd/generator"
    out.mkdir(parents=True)
    result = sandbox.run(GENERATOR, str(out))
    assert result.returncode == 0 and result.stderr == ""
    [record] = kmsg.read_text().splitlines()
    header, line = record.split(": ", 1)
    assert re.fullmatch(r"<13>captainos-cmdline\[\d+\]", header), header
    assert json.loads(line) == {"level": "error", "prog": "captainos-cmdline",
                                "msg": "refusing a parameter: not a VLAN id (1-4094)", "param": "vlan_id", "value": "0"}
