"""The one exception type library code raises; only cli.main() turns it into an exit."""

from __future__ import annotations


class CaptainError(Exception):
    """A failure the user can act on: a one-line message plus an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
