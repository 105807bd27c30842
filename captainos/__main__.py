"""`python3 -m captainos`."""

import sys

from captainos.cli import main

sys.exit(main())
