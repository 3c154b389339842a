"""Errors a user can act on. Every message names the file, tensor or sample at fault and says what to do."""


class DistQuantError(Exception):
    """Base class for errors reported to the user without a traceback."""


class CheckpointError(DistQuantError):
    """The source checkpoint is missing, corrupt, or not what the model config describes."""


class CalibrationError(DistQuantError):
    """The calibration set is missing, empty, or holds a sample that cannot be used."""


class RecipeError(DistQuantError):
    """The recipe YAML is invalid."""


class OutputError(DistQuantError):
    """The output folder cannot be written as asked."""
