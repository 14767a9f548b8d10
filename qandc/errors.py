"""The one error type for expected failures: the CLI prints its message as one line and exits 2."""


class QandcError(Exception):
    """A failure the user can act on (bad input, missing file, wrong format); never a bug."""


def error_summary(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
