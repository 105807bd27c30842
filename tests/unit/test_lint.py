"""Linters as tests: ruff, mypy and shellcheck over the whole repo."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(argv):
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)


def shell_scripts():
    """Every tracked-looking shell script outside image/ (*.sh files and files with a shell
    shebang); tests/image/test_tree.py checks the image's, with the library they source."""
    found = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO).parts
        if not path.is_file() or path.is_symlink() or rel[0] in {".git", "build", "out", ".tools", "image"}:
            continue
        if "__pycache__" in rel or ".pytest_cache" in rel:
            continue
        try:
            head = path.open("rb").readline(80)
        except OSError:
            continue
        if path.suffix == ".sh" or head.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash")):
            found.append(path)
    return found


def test_ruff():
    result = _run([sys.executable, "-m", "ruff", "check", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = _run([sys.executable, "-m", "mypy", "captainos"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck():
    scripts = shell_scripts()
    assert scripts, "no shell scripts found: the glob is broken"
    result = _run(["shellcheck", "--severity=style", *map(str, scripts)])
    assert result.returncode == 0, result.stdout
