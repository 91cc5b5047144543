"""The one exception type for mistakes a user can fix (config, data, CLI arguments).

The CLI prints its message alone and exits 2; anything else is an internal error (exit 1).
"""


class UserError(Exception):
    """A mistake in what the user gave us; the message names where (key path or file:line)."""

    exit_code = 2
