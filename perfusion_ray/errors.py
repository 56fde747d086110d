"""One error type for everything a user can get wrong: a message that names the problem, and a hint."""

from __future__ import annotations


class PerfusionError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and `hint: <hint>`, no traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
