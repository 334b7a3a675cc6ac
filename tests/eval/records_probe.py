"""`qwen2 eval|data ...` that stops once its results file holds N items, for the SIGKILL test to kill
it there: a kill timed by the clock lands after a different number of items on every machine (on a
fast one, after the run had finished).

    python records_probe.py N -- qwen2-cli-args...

The probe prints "paused" on stdout and waits, forever, for the test's SIGKILL.
"""

import sys
import threading

from qwen2.cli import main
from qwen2.eval.harness import Results


def pause_after(items: int) -> None:
    original = Results.add

    def add(self, record: dict) -> None:
        original(self, record)
        if len(self.records) == items:
            print("paused", flush=True)
            threading.Event().wait()

    Results.add = add


if __name__ == "__main__":
    pause_after(int(sys.argv[1]))
    main(sys.argv[3:])
