"""The stage table's one runner: order, inputs, skip, publish (with recorded stand-in stages)."""

import dataclasses

import pytest

from captainos.core import cache, config
from captainos.core.errors import CaptainError
from captainos.stages import pipeline


@pytest.fixture
def calls(monkeypatch, tmp_path):
    made: list[tuple[str, str, dict]] = []

    def fake(stage):
        def produce(cfg, runner, entries):
            made.append(("produce", stage.name, dict(entries)))
            return cache.cached(cfg.cache_dir, stage.name, cfg.arch.value, {"n": stage.name}, force=False,
                                produce=lambda work: (work / "x").write_text(stage.name))

        def publish(cfg, entry, entries):
            made.append(("publish", stage.name, dict(entries)))

        return dataclasses.replace(stage, produce=produce, publish=publish)

    monkeypatch.setattr(pipeline, "STAGES", tuple(fake(s) for s in pipeline.STAGES))
    return made


def _cfg(tmp_path, **env):
    return config.load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), "OUT_DIR": str(tmp_path / "out"), **env},
                       stages=pipeline.options())


def test_a_stage_verb_runs_its_inputs_first_and_passes_their_entries(calls, tmp_path):
    entries = pipeline.run_through(_cfg(tmp_path), "iso")
    assert [(what, name) for what, name, _ in calls if what == "produce"] == [
        ("produce", "kernel"), ("produce", "tools"), ("produce", "initramfs"), ("produce", "iso")]
    iso_inputs = next(given for what, name, given in calls if (what, name) == ("produce", "iso"))
    assert iso_inputs == {"kernel": entries["kernel"], "initramfs": entries["initramfs"]}
    assert [name for what, name, _ in calls if what == "publish"] == ["kernel", "tools", "initramfs", "iso"]


def test_skip_reuses_the_last_entry_and_publishes_nothing(calls, tmp_path):
    first = pipeline.run_through(_cfg(tmp_path), "initramfs")
    calls.clear()
    again = pipeline.run_through(_cfg(tmp_path, KERNEL_MODE="skip", ISO_MODE="skip"), "iso")
    assert again["kernel"] == first["kernel"] and "iso" not in again
    assert ("produce", "kernel") not in [(w, n) for w, n, _ in calls]
    assert [n for w, n, _ in calls if w == "publish"] == ["tools", "initramfs"]


def test_skip_without_an_earlier_build_is_one_clear_error(calls, tmp_path):
    with pytest.raises(CaptainError):
        pipeline.run_through(_cfg(tmp_path, TOOLS_MODE="skip"), "tools")
    assert calls == []



@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A stage added the way a new one is: one row (here in a test-local copy of the table),
    with its own mode and force options and its verb's own flag. Nothing else is edited.
    Yields the modes of its produce calls and the builds that made its entry."""
    from captainos.core.config import flag
    from captainos.core.needs import Need

    runs: list = []
    built: list = []

    def make(work):
        built.append(work)
        (work / "toy.txt").write_text("toy\n")

    def produce(cfg, runner, entries):
        runs.append(cfg.mode("toy"))
        return cache.cached(cfg.cache_dir, "toy", cfg.arch.value, {"toy": 1}, force=cfg.force("toy"), produce=make)

    row = pipeline.Stage("toy", "make the toy", (), lambda cfg: "a toy", produce, lambda cfg, entry, entries: None,
                         lambda cfg: (Need("true", "making the toy", "coreutils"),),
                         mode_help="how the toy stage runs", force_help="remake the toy even when cached",
                         flags=(flag("--loud", action="store_true", help="make it loud"),))
    monkeypatch.setattr(pipeline, "STAGES", (*pipeline.STAGES, row))
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    return runs, built


def test_a_new_stage_is_one_row_the_cli_takes(toy, capsys):
    from captainos import cli, host
    from captainos.core.config import StageMode

    verb, cfg, args = cli.parse(["toy", "--toy-mode", "docker", "--force-toy", "--loud"], env={})
    assert (verb, cfg.mode("toy"), cfg.force("toy"), cfg.force("kernel"), args.loud) == (
        "toy", StageMode.DOCKER, True, False, True)
    _, cfg, _ = cli.parse(["toy"], env={"TOY_MODE": "skip", "FORCE_TOY": "1"})
    assert cfg.mode("toy") is StageMode.SKIP and cfg.force("toy")
    assert cli.main(["toy", "--toy-mode", "podman"]) == 1
    assert "invalid choice: 'podman'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["toy", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "how the toy stage runs [env TOY_MODE; default: native]" in shown
    assert "remake the toy even when cached [env FORCE_TOY; default: False]" in shown and "--loud" in shown
    assert "-> toy -> checksums" in cli.verbs()["build"].help
    assert "true" in {n.command for n in host.needs(cli.parse([], env={})[1], "build")}
    docker = cli.parse(["toy", "--toy-mode", "docker"], env={})[1]
    assert {n.command for n in host.needs(docker, "toy")} == {"docker"}


def test_a_new_stage_is_one_row_the_build_cache_and_summary_follow(toy, capsys, monkeypatch):
    from captainos import cli, summary
    from captainos.core.config import StageMode

    runs, built = toy
    assert cli.main(["toy"]) == 0 and cli.main(["toy"]) == 0  # made, then a cache hit
    assert len(built) == 1 and "cached: toy" in capsys.readouterr().err
    assert cli.main(["toy", "--force-toy"]) == 0 and len(built) == 2  # its force option rebuilds
    assert cli.main(["toy", "--toy-mode", "skip"]) == 0  # its mode: skipped, the last entry kept
    assert runs == [StageMode.NATIVE] * 3 and len(built) == 2

    monkeypatch.setenv("FORCE_TOY", "1")
    _, cfg, _ = cli.parse(["summary"])
    report = summary.collect(cfg, with_mkosi=False)
    assert report["config"]["toy_mode"] == "native" and report["config"]["force_toy"] is True
    entry = cache.last(cfg.cache_dir, "toy", cfg.arch.value)
    assert report["stages"]["toy"] == {"key": entry.key, "path": str(entry.root)}
    assert (entry.root / "toy.txt").read_text() == "toy\n"
