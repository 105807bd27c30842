"""The builder container: Debian trixie with mkosi, the kernel toolchain and Go.

Its tag is the Dockerfile's content hash, so editing the Dockerfile builds a new image and
an unchanged one is reused. No Docker engine runs on the project's CI machines: the argv
builders here are unit-tested, the engine path is exercised by users who have one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from captainos.core import log
from captainos.core.config import REPO, Config
from captainos.core.errors import CaptainError
from captainos.core.run import run

DOCKERFILE = REPO / "Dockerfile"


def builder_tag(dockerfile: Path = DOCKERFILE) -> str:
    if not dockerfile.is_file():
        raise CaptainError(f"missing {dockerfile}", "the docker mode builds its image from the repo's Dockerfile")
    return "captainos-builder:" + hashlib.sha256(dockerfile.read_bytes()).hexdigest()[:12]


def build_argv(tag: str, no_cache: bool, dockerfile: Path = DOCKERFILE) -> list[str]:
    cmd = ["docker", "build", "--tag", tag, "--file", str(dockerfile)]
    if no_cache:
        cmd += ["--no-cache", "--pull"]
    return [*cmd, str(dockerfile.parent)]


def image_exists(tag: str) -> bool:
    result = run(["docker", "image", "inspect", tag], capture=True, capture_stderr=True, check=False)
    return result.returncode == 0


def ensure_builder(cfg: Config) -> str:
    """Build the builder image unless an image with this Dockerfile's hash exists."""
    tag = builder_tag()
    if cfg.no_cache or not image_exists(tag):
        with log.stage("builder image", tag):
            run(build_argv(tag, cfg.no_cache))
    return tag
