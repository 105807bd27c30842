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

    stages = tuple(fake(s) for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "BY_NAME", {s.name: s for s in stages})
    return made


def _cfg(tmp_path, **env):
    return config.load(env={"CAPTAINOS_CACHE": str(tmp_path / "cache"), "OUT_DIR": str(tmp_path / "out"), **env})


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
