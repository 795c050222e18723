"""slimtune's error hierarchy: every user-facing failure says what is wrong and how to fix it."""


class SlimtuneError(Exception):
    """Base class for errors slimtune raises on purpose (bad input, unsupported setup)."""


class ConfigError(SlimtuneError, ValueError):
    """A setting is invalid; the message names the field, the value received and what to use instead."""


class UnsupportedModelError(SlimtuneError):
    """The checkpoint is not a model family slimtune knows, or its structure differs from what we expect."""


class ModelLoadError(SlimtuneError):
    """A checkpoint folder or hub id could not be read (missing files, corrupt shards, offline hub)."""


class DataError(SlimtuneError, ValueError):
    """A dataset could not be read or a row does not fit any supported format."""


class ExportError(SlimtuneError):
    """An export could not be written; nothing partial is left behind."""


class KernelUnavailableError(SlimtuneError):
    """A requested GPU kernel cannot run here (no CUDA, no Triton, unsupported shape)."""


class TrainingOutOfMemoryError(SlimtuneError):
    """A training step did not fit in GPU memory; the message names the settings to change."""


class TrainingDivergedError(SlimtuneError):
    """The loss or the gradients stayed NaN/inf for several steps in a row (those updates were skipped)."""
