"""console-named: which ttys a console= names, for the udev rule that starts a getty on a
USB serial port that appears after the getty generator ran."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("cmdline", "tty", "named"), [
    ("console=tty0 console=ttyUSB0,115200n8 console=ttyS1", "ttyUSB0", True),
    ("console=ttyUSB1", "ttyUSB1", True),
    ("console=ttyUSB0 console=ttyS0", "ttyUSB0", True),  # not only the last console=
    ("console=ttyUSB0", "ttyUSB1", False),
    ("console=ttyUSB10", "ttyUSB1", False),
    ("ttyUSB0 xconsole=ttyUSB0 console", "ttyUSB0", False),
    ("", "ttyACM0", False),
])
def test_names_every_console_with_or_without_options(sandbox, cmdline, tty, named):
    sandbox.cmdline(cmdline)
    result = sandbox.run("console-named", tty)
    assert result.returncode == (0 if named else 1), result.stderr
    assert result.stderr == ""


def test_a_missing_argument_is_a_usage_error(sandbox):
    sandbox.cmdline("console=ttyUSB0")
    result = sandbox.run("console-named")
    assert result.returncode == 2 and result.messages("error") == ["usage: console-named TTY"]
