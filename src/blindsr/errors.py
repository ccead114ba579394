"""User-facing errors: one line, no traceback, a non-zero exit code from the CLI."""


class BlindSRError(Exception):
    """An error caused by the user's input or setup (bad file, missing weights, bad option).

    The CLI prints ``blindsr: error: <message>`` and exits with ``exit_code``; it never shows a
    traceback for these unless ``--debug`` is given.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ImageError(BlindSRError):
    """A file that cannot be read or written as an image."""


class WeightsError(BlindSRError):
    """A checkpoint that is missing, unreadable, or does not match the model."""
