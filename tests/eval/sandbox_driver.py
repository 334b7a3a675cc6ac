"""Runs attacks through a copy of qwen2/eval/sandbox.py that sits beside it, in whatever user and
capabilities this process was started with (test_sandbox.py starts it as root, as `nobody`, as
root without CAP_SYS_ADMIN, and where no namespace can be made). Standard library only, so that
any Python the user may run can run it.

stdin: {"attacks": {name: {"source", "prove", "limits"}}, "secret": path, "concurrent": bool}
stdout: one JSON object with the isolation level, each attack's result, and a control reading
of the secret from outside the sandbox (proof that the attack would succeed unsandboxed).
"""

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox  # noqa: E402

spec = json.load(sys.stdin)


def attack(item):
    name, a = item
    result = sandbox.run_program(a["source"], sandbox.Limits(**a["limits"]), prove=a["prove"])
    return name, dict(asdict(result), passed=result.passed)


with ThreadPoolExecutor(max_workers=4) as pool:
    results = dict(pool.map(attack, spec["attacks"].items()))

seen_beside = None
if spec["concurrent"] and sandbox.isolation() is not None:
    # one sample sleeps while another looks for it: a PID namespace each, so it finds nobody
    sleeper = threading.Thread(target=sandbox.run_program, args=("import time\ntime.sleep(4)\n",))
    sleeper.start()
    time.sleep(1.5)
    looker = sandbox.run_program(
        "import os\nfound = 0\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
        "        try:\n            found += b'program.py' in open(f'/proc/{p}/cmdline', 'rb').read()\n"
        "        except OSError:\n            pass\nprint('found', found)\n")
    sleeper.join()
    seen_beside = looker.output

unsafe = asdict(sandbox.run_program("print('ran unisolated')\n", unsafe=True))
with open(spec["secret"]) as f:
    control = f.read()
print(json.dumps(dict(uid=os.geteuid(), isolation=sandbox.isolation(), unsafe_isolation=sandbox.isolation(True),
                      results=results, seen_beside=seen_beside, unsafe=unsafe, control=control)))
