"""The root of every error a user can cause; its message names the input and the fault."""


class RecsysError(Exception):
    """Raised for bad input or an impossible request; the CLI and API show its message."""
