"""The lab's Go programs built ahead of a test run (what .ci/run starts in the background)."""

from __future__ import annotations

from captainos.core.errors import CaptainError
from captainos.lab import agent, prebuild


def test_prebuild_builds_tinkerbell_and_helm_in_the_runs_cache(tmp_path, monkeypatch):
    built = []
    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path))
    monkeypatch.setattr(agent, "build", lambda cfg, runner, program: built.append((cfg.cache_dir, program)) or tmp_path)
    assert prebuild.main() == 0
    assert built == [(tmp_path, agent.TINKERBELL), (tmp_path, agent.HELM)]


def test_a_failed_prebuild_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    def fail(cfg, runner, program):
        raise CaptainError("cannot download the tinkerbell module")

    monkeypatch.setenv("CAPTAINOS_CACHE", str(tmp_path))
    monkeypatch.setattr(agent, "build", fail)
    assert prebuild.main() == 1
    assert "cannot download the tinkerbell module" in capsys.readouterr().err
