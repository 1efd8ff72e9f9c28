"""The one exception type meddiff raises for bad user input.

The CLI turns it into a single ``error: ...`` line and exit code 2; Python callers can catch it.
"""


class MeddiffError(Exception):
    """Bad input or an impossible request, with a message that says what to do."""


def first_line(text: BaseException | str) -> str:
    """The first non-empty line of a message or of an exception's text: a terminal gets one line, never a dump.

    An exception with no text gives its type's name; an empty message "unknown error".
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(text).__name__ if isinstance(text, BaseException) else "unknown error"
