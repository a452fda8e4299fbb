"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: an unknown name, a wrong shape, a foreign dataset, a bad setting.

    The message is one readable line naming the problem and what would be valid.
    """

    exit_code = 2
