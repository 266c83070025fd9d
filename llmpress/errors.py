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


class SettingsError(LlmpressError, ValueError):
    """A setting out of its range (generation controls, sampling, the loop detector)."""


def cause_of(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause: libraries wrap the reason (transformers'
    config validation puts "The hidden size (66) is not a multiple ..." inside a generic error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
