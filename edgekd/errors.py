"""User-facing errors: one line naming the problem and the fix."""


class EdgekdError(Exception):
    """Bad input or environment. The message is shown to the user as a single line, without traceback."""

    def __init__(self, message: str):
        if "\n" in message:
            raise ValueError("EdgekdError messages must be one line")
        super().__init__(message)


class ValidationError(EdgekdError):
    """A key or value that does not fit its dataclass (configs, targets, method and model options; validate.py)."""
