"""Hub resolution without the network: offline and unreachable errors, and a snapshot
already in a local HF cache (built here in huggingface_hub's layout)."""

import pytest
from huggingface_hub import constants

from qwen2.errors import DownloadError
from qwen2.weights.hub import resolve_hub

REPO = "Qwen/Qwen2-0.5B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    # huggingface_hub reads its environment at import, so set its constants instead.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_offline_and_not_cached(hf_cache):
    with pytest.raises(DownloadError, match=r"could not reach the Hugging Face hub for 'Qwen/Qwen2-0.5B' "
                                            r"\(offline, or HF_HUB_OFFLINE is set\)"):
        resolve_hub(REPO)


def test_hub_unreachable(hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(DownloadError, match="could not reach the Hugging Face hub"):
        resolve_hub(REPO)


def test_cached_snapshot_is_used_offline(hf_cache):
    repo = hf_cache / "models--Qwen--Qwen2-0.5B"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text("{}")
    assert resolve_hub(REPO) == snapshot
    assert resolve_hub(REPO, revision=COMMIT) == snapshot


def test_invalid_id(hf_cache):
    with pytest.raises(DownloadError, match="neither a local path nor a hub id"):
        resolve_hub("no/such/thing/here")


def test_a_download_takes_the_weights_tokenizer_and_chat_template_only():
    """Filtered by huggingface_hub's own function, as snapshot_download filters a repo's files."""
    from huggingface_hub.utils import filter_repo_objects

    from qwen2.weights.hub import ALLOW_PATTERNS

    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "README.md", "LICENSE"]
    taken = set(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS))
    assert taken == set(files) - {"pytorch_model.bin", "README.md", "LICENSE"}
