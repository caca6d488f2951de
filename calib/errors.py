"""Errors a user can fix: the CLI prints their one line and exits with code 2."""


class UserError(Exception):
    pass


def described(err: BaseException) -> str:
    """An exception in one line for a UserError: its type and the first line of its message, if any."""
    message = str(err).strip()
    return f"{type(err).__name__}: {message.splitlines()[0]}" if message else type(err).__name__
