"""User-facing errors: one line that names the problem and the fix."""


class ChexopsError(Exception):
    """Raised for bad input or an unusable environment; the CLI prints it as one line and exits 2."""
