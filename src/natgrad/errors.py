"""Errors that are the user's to fix: the CLI prints them as one line and exits with 2."""


class UserError(Exception):
    """Bad input: an unknown name or key, an impossible value, missing data or files."""


class NonFiniteLossError(UserError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


def did_you_mean(value: str, choices) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
