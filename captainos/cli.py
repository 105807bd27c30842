"""The command line, generated from declarations: one flag per option (config.options() and
the stage table's pipeline.options()), one subcommand per verb (`verbs()`: build, a verb per
stage row with its own flags, then the table OTHER_VERBS)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captainos import __version__
from captainos.core import config, log
from captainos.core.config import Config, Flag, Option, flag
from captainos.core.errors import CaptainError
from captainos.stages import artifacts, pipeline

Handler = Callable[[Config, argparse.Namespace], None]


@dataclass(frozen=True)
class Verb:
    help: str  # its line in --help
    run: Handler
    flags: tuple[Flag, ...] = ()  # its own arguments, after the verb


def verbs() -> dict[str, Verb]:
    """Every verb, in --help order: build, one per row of the stage table, then OTHER_VERBS."""
    everything = f"run every stage: {' -> '.join(pipeline.names())} -> checksums (the default)"
    return {"build": Verb(everything, _build),
            **{stage.name: Verb(stage.help, _stage_verb(stage.name), stage.flags) for stage in pipeline.STAGES},
            **OTHER_VERBS}


def _add_option(group: argparse._ArgumentGroup, opt: Option) -> None:
    """The option's flag; SUPPRESS so a flag given before the verb is not reset after it."""
    shown = ",".join(str(config._jsonable(v)) for v in opt.default) if opt.sequence else config._jsonable(opt.default)
    help_text = f"{opt.help} [env {opt.env}; default: {shown if shown not in ('', None) else 'unset'}]"
    if opt.kind is bool:
        group.add_argument(opt.flag, dest=opt.name, action="store_const", const="1", default=argparse.SUPPRESS,
                           help=help_text)
        return
    group.add_argument(opt.flag, dest=opt.name, default=argparse.SUPPRESS, choices=opt.choices,
                       metavar=opt.metavar or (None if opt.choices else opt.name.upper()), help=help_text)


def _options() -> tuple[Option, ...]:
    """Every option: the Config fields', then the stage table's."""
    return (*config.options(), *pipeline.options())


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Every option's flag, in two groups: the Config fields' and the stage table's."""
    group = parser.add_argument_group("options (each also read from the environment variable shown)")
    for opt in config.options():
        _add_option(group, opt)
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="log every command run and show tracebacks [env DEBUG]")
    stages = parser.add_argument_group("stage options (from the stage table; also read from the env var shown)")
    for opt in pipeline.options():
        _add_option(stages, opt)


def _add_flag(parser: argparse.ArgumentParser, item: Flag) -> None:
    """A verb's own flag; a short form of an option sets that option (choices from its type)."""
    if not item.short_for:
        parser.add_argument(*item.names, **item.kwargs)
        return
    opt = {o.name: o for o in _options()}[item.short_for]
    parser.add_argument(*item.names, dest=opt.name, default=argparse.SUPPRESS, choices=opt.choices, **item.kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line plus a hint, not a usage dump, and takes
    no abbreviations (publish's --to would otherwise be an ambiguous --tools-...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CaptainError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="build.py",
        description="Build and test CaptainOS, the in-memory provisioning OS for Tinkerbell.",
        epilog="Run 'build.py VERB --help' for a verb's own options.",
    )
    parser.add_argument("--version", action="version", version=f"captainos {__version__}")
    _add_options(parser)
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name, verb in verbs().items():
        sub = subparsers.add_parser(name, help=verb.help, description=verb.help)
        _add_options(sub)
        for item in verb.flags:
            _add_flag(sub, item)
    return parser


def parse(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[str, Config, argparse.Namespace]:
    parser = make_parser()
    args, extra = parser.parse_known_args(list(argv))
    # `lab run --timeout 60 FILE`: argparse has already given the optional WORKFLOW its
    # (empty) turn when it meets FILE after an option; take FILE as the workflow then.
    if getattr(args, "workflow", None) is None and args.verb == "lab" and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.workflow, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verb = args.verb or "build"
    names = {opt.name for opt in _options()}
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = config.load(os.environ if env is None else env, flags, pipeline.options())
    return verb, cfg, args


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken like Ctrl-C: every cleanup that runs for an interrupt runs (a lab that
    `lab run` started is taken down, partial outputs removed)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("DEBUG", "").lower() in ("1", "true", "yes", "on")
    log.set_debug(debug)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        verb, cfg, args = parse(argv)
        verbs()[verb].run(cfg, args)
    except CaptainError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        log.error(exc.message)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141
    except KeyboardInterrupt as exc:
        log.error(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; nothing partial was kept")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug or an unforeseen OS error: still one line, not a traceback
        if debug:
            raise
        log.error(f"unexpected {type(exc).__name__}: {exc}")
        print("hint: rerun with --debug for the traceback, and report it", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# --- verb handlers: thin; the work is in the stage modules ---------------------------------

def _prepare(cfg: Config, verb: str) -> None:
    from captainos import host

    host.check(cfg, verb)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)


def _build(cfg: Config, args: argparse.Namespace) -> None:
    _prepare(cfg, "build")
    pipeline.build(cfg)


def _stage_verb(name: str) -> Callable[[Config, argparse.Namespace], None]:
    def handler(cfg: Config, args: argparse.Namespace) -> None:
        _prepare(cfg, name)
        # A stage's inputs come from the stages before it, resolved for this configuration:
        # cache hits when they were built (use --kernel-mode skip etc. to take the last build).
        pipeline.run_through(cfg, name)
    return handler


def _checksums(cfg: Config, args: argparse.Namespace) -> None:
    if args.verify:
        for name in artifacts.verify_checksums(cfg.out_dir, cfg.arch):
            print(f"{name}: OK")
        return
    path = artifacts.write_checksums(cfg.out_dir, cfg.arch)
    sys.stdout.write(path.read_text())


def _publish(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host
    from captainos.stages import publish

    if args.to:
        host.check(cfg, "publish")
    print(publish.run(cfg, Path(args.oci_dir) if args.oci_dir else None, args.to,
                      Path(args.sign_key) if args.sign_key else None))


def _summary(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import summary

    report = summary.collect(cfg)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        summary.show(report, cfg)


LAB_PACKAGES = {"yaml": "PyYAML", "grpc": "grpcio", "grpc_tools": "grpcio-tools"}  # module: PyPI name


def _lab_module(name: str) -> Any:
    """captainos.lab.<name>, or one line naming what of the lab extra is missing (building an
    image needs none of it, so a plain install has none)."""
    import importlib
    import importlib.util

    from captainos import host

    missing = [package for module, package in LAB_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        venv_python = host.VENV / "bin" / "python"
        if venv_python.is_file() and Path(sys.prefix).resolve() != host.VENV.resolve():
            # `./build.py` runs on the system's python3; `setup` put the lab extra in the venv:
            # the same command line again, there.
            log.info(f"    the lab extra is in {host.VENV}: running this command with {venv_python}")
            os.execv(venv_python, [str(venv_python), *sys.orig_argv[1:]])
        raise CaptainError(f"this verb needs the lab extra, missing: {', '.join(missing)}",
                           "'./build.py setup' makes .venv with it; or pip install 'captainos[lab]' "
                           "(from a checkout: pip install -e '.[lab]')")
    return importlib.import_module(f"captainos.lab.{name}")


def _qemu_test(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host

    host.check(cfg, "qemu-test")
    if args.workflow:
        _lab_module("e2e").run_workflow_file(cfg, args.workflow)
        return
    from captainos.lab import qemu

    qemu.interactive(cfg)


def _shell(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host

    host.shell(cfg)


def _clean(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host

    host.clean(cfg, everything=args.all)


def _bench(cfg: Config, args: argparse.Namespace) -> None:
    bench = _lab_module("bench")
    if args.runs < 1:
        raise CaptainError(f"invalid --runs {args.runs}", "use 1 or more")
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bench.run(cfg, only, args.runs, Path(args.output) if args.output else None, Path(args.workflow))


def _lab(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host

    host.check(cfg, "lab")
    _lab_module("cli").main(cfg, args)


def _setup(cfg: Config, args: argparse.Namespace) -> None:
    from captainos import host

    host.setup(cfg)


# The verbs besides build and the stages', with their own flags (`flag` takes argparse's
# add_argument arguments; short_for: a short name for an option).
OTHER_VERBS: dict[str, Verb] = {
    "checksums": Verb("write out/sha256sums-<arch>.txt (or check it with --verify)", _checksums, (
        flag("--verify", action="store_true", help="check out/ against the sums file"),)),
    "publish": Verb("out/ as an OCI image (files at its root) in a local layout (--oci-dir) and/or a registry (--to)",
                    _publish, (
        flag("--oci-dir", metavar="DIR", help="write the image as an OCI layout at DIR (replaced)"),
        flag("--to", metavar="REGISTRY/REPO:TAG",
             help="push it there; credentials from the usual auth file (REGISTRY_AUTH_FILE, "
                  "containers/auth.json, ~/.docker/config.json), never from this command line"),
        flag("--sign-key", metavar="FILE",
             help="sign the sums and the pushed image with this cosign key (its password from COSIGN_PASSWORD)"))),
    "qemu-test": Verb("boot out/ artifacts in QEMU (serial console on this terminal; Ctrl-A X quits)", _qemu_test, (
        flag("--workflow", metavar="FILE", help="run a workflow YAML end to end: registry, agent, server and VM"),
        flag("--accel", short_for="qemu_accel", help="same as --qemu-accel"))),
    "shell": Verb("open a shell in the builder container (docker mode) or with the build environment", _shell),
    "clean": Verb("remove out/ and build/ (with --all also the caches and the local mkosi)", _clean, (
        flag("--all", action="store_true", help="also remove caches and the local mkosi"),)),
    "summary": Verb("print the resolved configuration and mkosi's summary (--json: machine-readable)", _summary, (
        flag("--json", action="store_true", help="print the configuration as JSON on stdout"),)),
    "setup": Verb("install the host prerequisites (Debian/Ubuntu, as root) and the pinned mkosi", _setup),
    "bench": Verb("measure image size, boot time to the agent, RAM floor, build times, reproducibility", _bench, (
        flag("--only", default=",".join(("size", "boot", "netboot", "ram", "build", "repro")),
             help="comma-separated sections: size, boot, netboot, ram, build, repro (the default), and fleet, "
                  "nics (only when named)"),
        flag("--runs", type=int, default=3, help="boot runs to take the median of (default 3)"),
        flag("--output", metavar="FILE", help="also write the Markdown report to FILE"),
        flag("--workflow", metavar="FILE", default="examples/workflow.yaml",
             help="workflow for the boot and RAM figures (default examples/workflow.yaml)"))),
    "lab": Verb("the real Tinkerbell on this machine: 'lab up', 'lab run WORKFLOW', 'lab status', 'lab down'", _lab, (
        flag("action", choices=("ca", "up", "run", "status", "down"),
             help="ca: make the lab's CA and print its path (build the image with it); up: start the lab; run: "
                  "provision one VM; status: show it; down: stop it"),
        flag("workflow", nargs="?", metavar="WORKFLOW", help="workflow file for 'run'"),
        flag("--name", default="lab", help="lab name: labs with other names run side by side (default lab)"),
        flag("--boot", default="bios", choices=("bios", "uefi", "iso"),
             help="how the VM boots: BIOS netboot, UEFI netboot, or the ISO Smee patched (default bios)"),
        flag("--ipv6", default="", choices=("netboot-then-ipv6", "ipv6-only"),
             help="run: netboot over IPv4, then reach Tinkerbell, the registry and syslog over IPv6 only; or boot "
                  "directly on the lab's IPv6-only network, every server by name (implies a direct boot)"),
        flag("--auth", action="store_true",
             help="up (or a run that starts the lab): the agent only in an htpasswd registry, pulled with "
                  "docker_registry= and credentials"),
        flag("--chart", action="store_true",
             help="up: also serve the OS the Helm chart's way (its nginx over the published image); run: the VM "
                  "netboots from it"),
        flag("--vm", type=int, default=1, help="VM number: its MAC and address (default 1)"),
        flag("--timeout", type=float, default=900.0,
             help="run: seconds from power-on to the workflow's end (default 900)"))),
}
