"""Errors a user can fix: the entry points print their message as one line and exit non-zero."""


class UserError(Exception):
    """Base of the errors whose message alone says what to change; ``exit_code`` for the CLI."""

    exit_code = 2


class EvaluateError(UserError, ValueError):
    """A ``python -m mae.evaluate`` task that cannot run as asked; the message says what to
    change."""


def user_message(error: UserError) -> str:
    """``error``'s own message. Raised in a DataLoader worker, the error reaches the main process
    rebuilt by torch as the same class around a whole traceback (``Caught DataError in DataLoader
    worker process 0.`` first, the message some 50 lines later, after the traceback's
    ``module.Class: `` prefix); that message is taken back out, so the user reads it first."""
    text = str(error)
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    if not text.startswith("Caught ") or prefix not in text:
        return text
    return text[text.rindex(prefix) + len(prefix) :].strip()
