"""The errors users see. Each says what was wrong and what was expected."""


class PocketDiffusionError(Exception):
    """Base class: a clear, user-facing problem (bad input, bad file), never an internal bug."""


class CheckpointError(PocketDiffusionError, ValueError):
    """A model file or folder that cannot be read or does not fit the architecture."""


class TokenizerFilesMissing(PocketDiffusionError, FileNotFoundError):
    """The CLIP vocabulary (vocab.json + merges.txt) was not found."""
