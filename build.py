#!/usr/bin/env python3
"""Run the CaptainOS build tool from a checkout, without installing it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captainos.cli import main

if __name__ == "__main__":
    sys.exit(main())
