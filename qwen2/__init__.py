"""qwen2: the Qwen2 model family, from scratch on PyTorch."""
