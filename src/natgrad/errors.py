"""Errors that are the user's to fix: the CLI prints them as one line and exits with 2."""


class UserError(Exception):
    """Bad input: an unknown name or key, an impossible value, missing data or files."""


class NonFiniteLossError(UserError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class Preempted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint at the current step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's code for a process ended by that signal


def check_choice(name: str, value: str, choices) -> None:
    """Raise a :class:`UserError` naming the choices (and the closest one) unless ``value`` is one of them."""
    if value not in choices:
        close = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise UserError(f"{name}={short(value)} is not one of {', '.join(choices)}{close}")


def short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def did_you_mean(value: str, choices) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
