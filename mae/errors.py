"""Errors a user can fix: the entry points print their message as one line and exit non-zero."""


class UserError(Exception):
    """Base of the errors whose message alone says what to change; ``exit_code`` for the CLI."""

    exit_code = 2
