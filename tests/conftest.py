from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), fetched once and cached."""
    from qwen2.weights.default import default_model_path

    return default_model_path()
