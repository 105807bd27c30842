"""The README documents every option, verb and env var the tool has (docs cannot drift)."""

import dataclasses
from pathlib import Path

from captainos import cli, config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_option_is_documented_with_flag_and_env():
    for f in dataclasses.fields(config.Config):
        assert f"`{config.option_flag(f)}`" in README, config.option_flag(f)
        assert f"`{config.option_env(f)}`" in README, config.option_env(f)


def test_every_verb_is_documented():
    for verb in cli.VERBS:
        assert f"| `{verb}`" in README, verb
