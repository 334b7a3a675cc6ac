"""`python -m qwen2.bench ...` is `qwen2 bench ...`, errors included."""

import sys

from qwen2.cli import main

main(["bench", *sys.argv[1:]])
