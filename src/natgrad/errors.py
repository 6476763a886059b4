"""Errors that are the user's to fix: the CLI prints them as one line and exits with 2."""


class UserError(Exception):
    """Bad input: an unknown name or key, an impossible value, missing data or files."""


class NonFiniteLossError(UserError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
