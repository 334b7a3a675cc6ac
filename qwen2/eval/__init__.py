"""Long-context evaluations: strided perplexity (perplexity.py) and needle in a haystack (niah.py)
on real Wikipedia prose (data.py); `qwen2 eval ...` is cli.py."""
