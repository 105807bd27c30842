"""iso stage (being written)."""

from __future__ import annotations

from pathlib import Path

from captainos.config import Config
from captainos.errors import CaptainError
from captainos.run import Runner


def build(cfg: Config, runner: Runner, *inputs: Path) -> Path:
    raise CaptainError("the iso stage is not implemented yet")
