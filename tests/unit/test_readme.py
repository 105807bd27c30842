"""The README documents every option, verb and env var the tool has (docs cannot drift)."""

from pathlib import Path

from captainos import cli
from captainos.core import config
from captainos.stages import pipeline

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_option_is_documented_with_flag_and_env():
    for opt in (*config.options(), *pipeline.options()):
        assert f"`{opt.flag}`" in README, opt.flag
        assert f"`{opt.env}`" in README, opt.env


def test_every_verb_is_documented():
    for verb in cli.verbs():
        assert f"| `{verb}`" in README, verb


def _section(title: str) -> str:
    """The README text under a `## title` heading, up to the next heading of that level."""
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:] if end < 0 else README[start:end]


def test_user_facing_sections_are_present():
    # A README edit once dropped these whole sections; the issues require each of them.
    for title in ("Security notes", "ISO (virtual media, machines without PXE)", "Testing with QEMU"):
        assert _section(title).count("\n") > 5, title
    assert "### Run a workflow against a local VM" in _section("Testing with QEMU")


def test_iso_placeholder_is_documented_as_the_code_has_it():
    import hashlib

    from captainos.core import pins

    iso = _section("ISO (virtual media, machines without PXE)")
    digest = hashlib.sha256(pins.ISO_MAGIC.encode()).hexdigest()
    assert f"`{pins.ISO_MAGIC[:16]}`" in iso and f"`{pins.ISO_MAGIC[-16:]}`" in iso
    assert f"`{digest[:8]}...{digest[-7:]}`" in iso
    assert f"{len(pins.ISO_MAGIC)} lowercase letters" in iso
    assert "--secure-boot" in iso and "What is signed" in iso and "What is not" in iso


def test_workflow_example_is_documented_and_exists():
    section = _section("Testing with QEMU")
    assert "./build.py qemu-test --workflow examples/workflow.yaml" in section
    assert (Path(__file__).resolve().parents[2] / "examples" / "workflow.yaml").is_file()


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` sets the machine up with the README's first command and then runs the README's
    full-suite command as written (issue 33: the two commands work as written on Debian)."""
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    quick = _section("Quick start")
    assert "./build.py setup && ./build.py" in quick and "\n.venv/bin/pytest " in quick
    command = '.venv/bin/pytest -m "not kernel_compile and not slow"'
    assert f"```sh\n{command}\n```" in quick
    assert "python3 ./build.py setup\n" in ci
    assert f"\n{command} || status=$?\n" in ci


def test_the_lab_commands_parse_in_the_order_written_and_name_the_ca_lab_ca_makes():
    """The README's lab block is what a new user types first (issue 34): every line is a command
    the CLI takes, `lab ca` comes before the build that names its file, that file is where
    `lab ca` makes it in the default cache, and the workflow it runs exists."""
    import shlex

    from captainos.lab import registry

    section = _section("The real-Tinkerbell lab")
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert [c[0] for c in commands] == ["./build.py"] * len(commands)
    for argv in commands:
        verb, _, args = cli.parse([str(Path(w).expanduser()) if w.startswith("~/") else w for w in argv[1:]],
                                  env={})
        if verb == "lab" and args.action == "run":
            assert (Path(__file__).resolve().parents[2] / args.workflow).is_file(), args.workflow
    order = [" ".join(c[1:3]) for c in commands]
    assert order.index("lab ca") < next(i for i, c in enumerate(commands) if "--extra-ca-certs" in c) \
        < order.index("lab up") < order.index("lab run")
    build = next(c for c in commands if "--extra-ca-certs" in c)
    named = Path(build[build.index("--extra-ca-certs") + 1]).expanduser()
    assert named == registry.CA(config.load(env={}).cache_dir / "e2e-ca").cert
