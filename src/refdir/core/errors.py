"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RefdirError(Exception):
    """A problem the user can fix: bad input, missing package, unsupported model.

    The message is a single line that names the problem and the fix.
    """
