"""The one exception type meddiff raises for bad user input.

The CLI turns it into a single ``error: ...`` line and exit code 2; Python callers can catch it.
"""


class MeddiffError(Exception):
    """Bad input or an impossible request, with a message that says what to do."""
