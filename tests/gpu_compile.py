"""Triton kernels compiled to GPU machine code on a machine with no GPU: Triton's compiler and the
ptxas in its wheel go down to a cubin, as a GPU's first call would, so a kernel that the interpreter
runs but that cannot compile fails in the tests rather than on a lent GPU."""

import json
import os
import subprocess
import sys

PRELUDE = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def cubin_bytes(kernel, types, constants, warps, arch):
    names = [n for n in kernel.arg_names if n not in constants]
    signature = {**dict(zip(names, types)), **{n: "constexpr" for n in constants}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return len(triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm["cubin"])
"""


def cubin_sizes(cases: str) -> dict[str, int]:
    """Run `cases`, code that fills a dict `sizes` by calling cubin_bytes(kernel, argument types,
    constexprs, warps, arch), in a process of its own: in the tests' one Triton loaded in interpreter
    mode (tests/conftest.py). Returns `sizes`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = PRELUDE + "sizes = {}\n" + cases + "\nprint(json.dumps(sizes))\n"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
