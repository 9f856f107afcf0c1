"""User-facing errors.

Every failure a user can cause (bad input, a model that cannot be loaded, a
corrupt file) raises a :class:`HeadVisError` whose message is written for the
user. Pages show ``str(err)`` in an error box and the CLI prints it and exits
with status 2; neither shows a traceback.
"""


class HeadVisError(Exception):
    """Base class: the message is shown to the user as it is."""


class ModelLoadError(HeadVisError):
    """The model could not be loaded (base for the specific reasons below)."""


class UnknownModelError(ModelLoadError):
    pass


class ModelNeedsNetworkError(ModelLoadError):
    pass


class UnsupportedArchitectureError(ModelLoadError):
    pass


class NotEnoughMemoryError(ModelLoadError):
    pass


class InputError(HeadVisError):
    """Bad user input: an empty prompt, a head out of range, a malformed spec."""


class CorruptFileError(HeadVisError):
    """A stored result or experiment file could not be read back."""
