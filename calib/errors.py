"""Errors a user can fix: the CLI prints their one line and exits with code 2."""


class UserError(Exception):
    pass
