"""`python3 -m captainos.lab.prebuild`: build the lab's Go programs (the Tinkerbell server and
helm) into the cache before a test run needs them.

`.ci/run` starts it at the lowest priority beside the test run: the first hour's image tests
boot one single-threaded VM at a time and leave a core idle, and a cold Tinkerbell build is
about ten minutes of it. The lab then finds the entries built, or waits on their lock (the
cache's flock) for the build under way. Warm, each is a cache hit."""

from __future__ import annotations

import os
import sys

from captainos.core import config, log
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import agent

PROGRAMS = (agent.TINKERBELL, agent.HELM)


def main() -> int:
    cfg = config.load(env={k: v for k, v in os.environ.items() if k in ("CAPTAINOS_CACHE", "ARCH")})
    try:
        for program in PROGRAMS:
            log.info(f"{program.binary}: {agent.build(cfg, Runner(), program=program)}")
    except CaptainError as exc:  # the lab builds it again itself, and says why if it fails there too
        log.error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
