"""Sums over the processes (qwen2.distributed): metrics that only some processes have are summed key by
key, with the same collective calls on every process, so the next collective still pairs up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2 import distributed
from tests.train.test_align import free_port
from tests.train.test_trainer import ENV, PACKAGE_ROOT

TORCHRUN = Path(sys.executable).with_name("torchrun")
PROBE = """
import json, sys
from qwen2 import distributed
rank, world = distributed.world()
# rank 0's step had no pair: it lacks the loss metrics rank 1's has
sums = distributed.all_sum_by_key({"a": 1.0} if rank == 0 else {"a": 2.0, "b": 3.0})
after = distributed.all_sum(10.0 * (rank + 1))  # pairs up only if the calls before did
if rank == 0:
    open(sys.argv[1], "w").write(json.dumps({"sums": sums, "after": after}))
distributed.shutdown()
"""


def test_alone_the_sums_are_the_values():
    assert distributed.all_sum_by_key({"a": 1.5, "b": 2.0}) == {"a": 1.5, "b": 2.0}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_processes_sum_each_key_any_of_them_has_and_stay_in_step(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    run = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          str(tmp_path / "probe.py"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text()) == {"sums": {"a": 3.0, "b": 3.0}, "after": 30.0}
