"""User-facing errors: one line, no stack trace, non-zero exit from the CLI."""


class LlmpressError(Exception):
    """An error the user can act on. The CLI prints ``str(err)`` on one line and exits 2."""


class RecipeError(LlmpressError):
    """A recipe that does not parse or validate."""


class ModelLoadError(LlmpressError):
    """A model or checkpoint that cannot be found, read or understood."""


class CalibrationError(LlmpressError):
    """Calibration or evaluation text that cannot be read or is too short."""


class OutputError(LlmpressError):
    """An output folder that cannot be written safely."""
