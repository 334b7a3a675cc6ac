"""Long-document question answering (Qwen-Agent style): see docqa.py.

`from qwen2.agent import DocQA` imports it on first use, so that `qwen2 --help`, which reads the
defaults below, does not import torch.
"""

DEFAULT_BUDGET = 4500  # tokens of document text in the answering prompt (Qwen-Agent's MAX_RAG_TOKEN_SIZE)
DEFAULT_RETRIES, DEFAULT_MAX_CALLS = 2, 4

__all__ = ["Answer", "DocQA", "Evidence"]


def __getattr__(name: str):
    if name in __all__:
        from qwen2.agent import docqa

        return getattr(docqa, name)
    raise AttributeError(f"module 'qwen2.agent' has no attribute {name!r}")
