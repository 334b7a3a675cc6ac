"""Errors a user can cause. Each message says what went wrong and what to do about it.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class Qwen2Error(Exception):
    """Base class for every error the user can act on."""


class ConfigError(Qwen2Error):
    """A config is missing, malformed, or describes an architecture we do not run."""


class WeightsError(Qwen2Error):
    """A checkpoint file is missing, truncated, corrupt, or holds unexpected tensors."""


class DownloadError(Qwen2Error):
    """A model could not be fetched (offline, unknown id, checksum mismatch)."""


class TokenizerError(Qwen2Error):
    """A tokenizer or chat template could not be built or rendered."""


class RequestError(Qwen2Error):
    """A generation request is invalid (bad sampling value, prompt too long, ...)."""
