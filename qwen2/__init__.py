"""qwen2: the Qwen2 model family, from scratch on PyTorch.

`from qwen2 import load` is qwen2.loading.load; it is imported on first use, so that
`import qwen2` (and `qwen2 --help`) does not pay for importing torch.
"""

from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error

__all__ = ["Qwen2Config", "Qwen2Error", "load", "load_model"]


def __getattr__(name: str):
    if name in ("load", "load_model"):
        from qwen2 import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'qwen2' has no attribute {name!r}")
