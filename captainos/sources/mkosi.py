"""mkosi, which is not on PyPI: Debian trixie's pinned package, unpacked into .tools/.

`setup` installs it (download verified against the pinned sha256, then `dpkg-deb -x`, then
renamed into place); the initramfs stage runs it from there with PYTHONPATH.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from captainos.core import cache, log, pins
from captainos.core.config import REPO
from captainos.core.run import run
from captainos.sources import debian

TOOLS_DIR = REPO / ".tools"


def directory() -> Path:
    return TOOLS_DIR / f"mkosi-{pins.MKOSI.version}"


def pythonpath() -> Path:
    return directory() / "usr" / "lib" / "python3" / "dist-packages"


def install(pin: pins.DebPin, target: Path, mirror: str = pins.DEBIAN_MIRROR) -> None:
    """Download the pinned .deb, verify its sha256, unpack it, and rename it into place."""
    if (target / cache.STAMP).is_file():
        log.info(f"    mkosi {pin.version} already in {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mkosi-") as tmp:
        log.info(f"    downloading {mirror}/{pin.filename}")
        deb = debian.package(pin.name, "all", cache_dir=Path(tmp) / "cache", pin=pin, mirror=mirror)
        unpacked = Path(tmp) / "root"
        run(["dpkg-deb", "-x", deb, unpacked])
        (unpacked / cache.STAMP).write_text(pin.sha256 + "\n")
        cache.remove(target)
        os.rename(unpacked, target)
    log.info(f"    mkosi {pin.version} unpacked in {target}")
