"""The collectives in the compiled HLO of a sharded base forward, LoRA forward and LoRA
train step (8 virtual CPU devices, mesh data x model = 2 x 4, Megatron layout), as
(collective, largest result element count); the assertions live in
``tests/sharded_cases.py``, which this runs. Run: ``python benchmarks/collectives.py``.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    tests = os.path.join(HERE, "..", "tests")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "sharded_cases.py",
            "-k",
            "keeps_the_base",
        ],
        env=env,
        cwd=tests,
        capture_output=True,
        text=True,
    )
    print(
        "\n".join(
            line
            for line in proc.stdout.splitlines()
            if line.lstrip(".").startswith(("collectives", "LoRA"))
        )
    )
    sys.exit(proc.returncode)
