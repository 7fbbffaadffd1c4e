"""The one error type the commands raise for problems the user can fix (`main` prints it on one line)."""


class UserError(Exception):
    """A problem the user can fix, said in one line."""
