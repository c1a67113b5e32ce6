"""Errors that carry a message a user can act on."""


class InputError(ValueError):
    """Bad user input (file, image, label map, option). The message says what is wrong and what to do."""


class OutputError(InputError):
    """The results cannot be written (folder not ours, in use by another run, full disk, no permission)."""


class WeightsError(RuntimeError):
    """Missing, corrupt or mismatched model weights."""
