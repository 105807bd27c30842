import json

import pytest

from captainos import cli
from captainos.core.config import Arch


def test_verbs_cover_the_interface():
    assert set(cli.verbs()) == {"build", "kernel", "tools", "initramfs", "iso", "checksums", "qemu-test",
                                "shell", "clean", "summary", "setup", "bench", "lab", "publish"}


def test_default_verb_is_build():
    verb, _, _ = cli.parse([], env={})
    assert verb == "build"


@pytest.mark.parametrize("argv", [["--arch", "arm64", "kernel"], ["kernel", "--arch", "arm64"]])
def test_flags_work_before_and_after_the_verb(argv):
    verb, cfg, _ = cli.parse(argv, env={})
    assert verb == "kernel" and cfg.arch is Arch.ARM64


def test_bool_flag_sets_true_over_env():
    _, cfg, _ = cli.parse(["--force-kernel"], env={"FORCE_KERNEL": "0"})
    assert cfg.force("kernel") is True


def test_help_lists_every_verb_and_env_var(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for verb in cli.verbs():
        assert verb in out
    for env in ("ARCH", "KERNEL_SRC", "KERNEL_VERSION", "FORCE_KERNEL", "FORCE_TOOLS", "NO_CACHE",
                "QEMU_APPEND", "QEMU_MEM", "QEMU_SMP"):
        assert f"env {env};" in out


@pytest.mark.parametrize("verb", list(cli.verbs()))
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    assert cli.verbs()[verb].help.split()[0] in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--arch", "sparc"], {}, "invalid choice: 'sparc'"),
        (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
        (["summary"], {"ARCH": "ppc"}, "invalid ARCH 'ppc'"),
        (["--qemu-smp", "x", "summary"], {}, "invalid --qemu-smp 'x'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, env, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 2  # error + hint
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(("option", "text", "message"), [
    ("--embed-images", "quay.io/ok:1\nNot/Valid:ref\n", "images.txt:2: not an image reference: 'Not/Valid:ref'"),
    ("--ssh-authorized-keys", "ssh-ed25519 notbase64!\n", "images.txt:1: not an SSH public key"),
])
def test_a_bad_site_file_stops_the_build_before_any_work(option, text, message, capsys, monkeypatch, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(text)
    out = tmp_path / "out"
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["initramfs", option, str(listing), "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 2, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_summary_json_is_machine_readable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARCH", "arm64")
    monkeypatch.setattr("captainos.summary._mkosi_summary", lambda cfg: "mkosi says hi\n")
    assert cli.main(["summary", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["arch"] == "arm64"
    assert report["config"]["cache_dir"] == str(tmp_path / "cache")
    assert report["stages"]["kernel"] is None
    assert report["mkosi"] == "mkosi says hi\n"


def test_missing_prerequisite_is_named_with_its_package(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.setattr("captainos.sources.golang.GO_FALLBACK", tmp_path / "go" / "bin" / "go")  # nor setup's Go
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["tools", "--tools-source", "go", "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert ("missing go: needed for building containerd/runc/nerdctl/CNI from Go modules; "
            "install: ./build.py setup") in err
    assert "missing pkg-config: needed for runc's libseccomp lookup; install: apt-get install pkg-config" in err
    assert not (tmp_path / "out").exists()


def test_an_unexpected_error_is_one_line_without_debug(capsys, monkeypatch):
    def boom(cfg, args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.OTHER_VERBS, "summary", cli.Verb("", boom))
    assert cli.main(["summary"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert err.startswith("error: unexpected OSError: [Errno 28] No space left on device")
    with pytest.raises(OSError):  # --debug shows the real traceback
        cli.main(["summary", "--debug"])


def test_qemu_test_takes_accel_as_a_short_form():
    _, cfg, _ = cli.parse(["qemu-test", "--accel", "tcg"], env={})
    assert cfg.qemu_accel.value == "tcg"
    _, cfg, _ = cli.parse(["qemu-test"], env={"QEMU_ACCEL": "kvm"})
    assert cfg.qemu_accel.value == "kvm"


def test_lab_verb_arguments():
    verb, _, args = cli.parse(["lab", "run", "examples/workflow.yaml", "--boot", "uefi", "--vm", "3"], env={})
    assert verb == "lab" and args.action == "run" and args.workflow == "examples/workflow.yaml"
    assert args.boot == "uefi" and args.vm == 3 and args.name == "lab" and not args.auth
    _, _, args = cli.parse(["lab", "up", "--auth", "--name", "second"], env={})
    assert args.action == "up" and args.auth and args.name == "second"


def test_lab_run_takes_its_workflow_after_options():
    _, _, args = cli.parse(["lab", "run", "--timeout", "600", "examples/workflow.yaml"], env={})
    assert args.action == "run" and args.workflow == "examples/workflow.yaml" and args.timeout == 600


def test_a_stray_argument_is_still_refused(capsys):
    assert cli.main(["lab", "run", "a.yaml", "b.yaml"]) == 1
    assert "unrecognized arguments: b.yaml" in capsys.readouterr().err
    assert cli.main(["summary", "x"]) == 1


def test_sigterm_runs_the_interrupt_cleanup(monkeypatch, capsys):
    import os
    import signal

    cleaned = []

    def handler(cfg, args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)

    monkeypatch.setitem(cli.OTHER_VERBS, "summary", cli.Verb("", handler))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["summary"]) == 143
    assert cleaned == [True]
    assert "terminated; nothing partial was kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_lab_bad_action_is_one_line(capsys):
    assert cli.main(["lab", "sideways"]) == 1
    err = capsys.readouterr().err
    assert "invalid choice: 'sideways'" in err and "Traceback" not in err


def test_lab_run_without_a_workflow_is_refused(capsys, tmp_path, monkeypatch):
    from captainos import host

    monkeypatch.setattr(host, "check", lambda cfg, verb: None)
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path))
    assert cli.main(["lab", "run"]) == 1
    assert "'lab run' needs a workflow file" in capsys.readouterr().err
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize("argv", [["bench", "--only", "size"], ["lab", "status"]])
def test_a_lab_verb_without_the_lab_extra_names_it(argv, capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    monkeypatch.setattr("captainos.host.check", lambda cfg, verb: None)
    monkeypatch.setattr("captainos.host.VENV", tmp_path / "no-venv")  # setup has not run
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "needs the lab extra, missing: grpcio" in err and "./build.py setup" in err and "captainos[lab]" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 2  # the error and its hint


def test_a_lab_verb_on_the_systems_python_runs_again_in_the_venv_setup_made(capsys, monkeypatch, tmp_path):
    """`./build.py lab ca` as the README writes it: the system's python3 has no lab extra, the
    venv `setup` made has; the same command line runs again there."""
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    monkeypatch.setattr("captainos.host.VENV", venv)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "./build.py", "lab", "ca"])
    execs: list[tuple[object, list[str]]] = []

    def execv(path, args):
        execs.append((path, args))
        raise SystemExit(0)  # exec does not return

    monkeypatch.setattr("os.execv", execv)
    with pytest.raises(SystemExit):
        cli.main(["lab", "ca"])
    assert execs == [(venv / "bin" / "python", [str(venv / "bin" / "python"), "./build.py", "lab", "ca"])]
    # Already in that venv: no second exec, the missing package is named.
    monkeypatch.setattr(sys, "prefix", str(venv))
    assert cli.main(["lab", "ca"]) == 1 and len(execs) == 1
    assert "needs the lab extra, missing: grpcio" in capsys.readouterr().err


def test_the_stage_verbs_are_the_stage_table():
    from captainos.stages import pipeline

    assert pipeline.names() == ("kernel", "tools", "initramfs", "iso")
    assert [s.name for s in pipeline.closure("iso")] == ["kernel", "tools", "initramfs", "iso"]
    assert [s.name for s in pipeline.closure("initramfs")] == ["kernel", "tools", "initramfs"]
    assert pipeline.stages_of("tools") == (pipeline.by_name("tools"),) and pipeline.stages_of("summary") == ()
    for stage in pipeline.STAGES:
        assert cli.verbs()[stage.name].help == stage.help
