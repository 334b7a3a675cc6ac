"""qwen2: the Qwen2 model family, from scratch on PyTorch."""

from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error

__all__ = ["Qwen2Config", "Qwen2Error", "load"]


def load(*args, **kwargs):
    """Load a model and return an LLM (see qwen2.engine.llm.load)."""
    from qwen2.engine.llm import load as _load

    return _load(*args, **kwargs)
