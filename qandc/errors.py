"""The one error type for expected failures: the CLI prints its message as one line and exits 2."""


class QandcError(Exception):
    """A failure the user can act on (bad input, missing file, wrong format); never a bug."""
