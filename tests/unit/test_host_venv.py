"""setup's test environment: .venv with this checkout and its extras, reinstalled only when
pyproject.toml changes."""

from __future__ import annotations

from pathlib import Path

from captainos import host


def test_the_venv_is_made_once_and_reinstalled_only_when_pyproject_changes(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_run(argv, **kwargs):
        argv = [str(a) for a in argv]
        calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "python").write_text("")

    monkeypatch.setattr(host, "run", fake_run)
    venv = tmp_path / ".venv"
    host.make_venv(venv)
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["-m", "pip"]]
    assert calls[1][0] == str(venv / "bin/python") and calls[1][-1] == f"{host.REPO}[dev,lab]"
    host.make_venv(venv)
    assert len(calls) == 2  # up to date: nothing run
    (venv / ".captainos-pyproject.sha256").write_text("an older pyproject\n")
    host.make_venv(venv)
    assert [c[1:3] for c in calls[2:]] == [["-m", "pip"]]  # the venv stays, the install is redone


def test_setup_installs_what_the_venv_needs():
    assert "python3-venv" in host.APT_PACKAGES
