"""Errors a user can cause. Each message says what went wrong and what to do about it.

The CLI prints these as one line and exits non-zero; anything else is a bug, whose traceback
the CLI shows with --debug (or QWEN2_DEBUG=1).
"""


class Qwen2Error(Exception):
    """Base class for every error the user can act on; raise one of the subclasses."""


class OptionError(Qwen2Error):
    """An option or argument has a value we cannot use (device, dtype, ctx, an input file, ...)."""


class ConfigError(Qwen2Error):
    """A config is missing, malformed, or describes an architecture we do not run."""


class WeightsError(Qwen2Error):
    """A checkpoint is missing, truncated, corrupt, or holds tensors its config does not imply."""


class DownloadError(Qwen2Error):
    """A model or data file could not be fetched (offline, unknown id, checksum mismatch)."""


class TokenizerError(Qwen2Error):
    """A tokenizer or chat template could not be built or rendered."""


class RequestError(Qwen2Error):
    """A generation request is invalid (bad sampling value, prompt too long, ...)."""


class DataError(Qwen2Error):
    """A data file (training or evaluation) is missing, unreadable, or holds records we cannot use."""


class EndpointError(Qwen2Error):
    """A server given by --endpoint cannot be reached, or refuses or fails a request."""


class ClusterError(Qwen2Error):
    """A Ray worker given by --ray (an engine actor) died or failed: killed, out of memory, its node lost."""
