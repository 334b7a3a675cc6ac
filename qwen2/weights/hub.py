"""Resolve a Hugging Face hub id to a local snapshot folder, downloading what is missing.

Only what we load is fetched: the JSON files (config, tokenizer, index) and safetensors
weights. GGUF repos hold one file per quantization; download the one you want and pass
its path instead. huggingface_hub handles the cache, HF_HUB_OFFLINE, tokens and mirrors.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from qwen2.errors import DownloadError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]  # newer checkpoints keep their template in chat_template.jinja


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """Local folder holding `repo_id` (config, tokenizer, safetensors) at `revision`."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except HFValidationError:
        raise DownloadError(f"{repo_id!r} is neither a local path nor a hub id like 'Qwen/Qwen2-0.5B'") from None
    except GatedRepoError:
        raise DownloadError(f"{repo_id!r} is gated: accept its license on huggingface.co, then log in "
                            "with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"no model {repo_id!r} on the Hugging Face hub (if it is private, log in "
                            "with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError):
        raise DownloadError(f"could not reach the Hugging Face hub for {repo_id!r} (offline, or HF_HUB_OFFLINE "
                            "is set) and it is not in the local hub cache") from None
