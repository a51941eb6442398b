"""How fast the command line answers when nothing trains: the median wall time of `saelab --help`,
`saelab --cfg job` and one shell-completion query (a TAB), each in a fresh process.

    python benchmarks/cli_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "saelab --help": (["--help"], {}),
    "saelab --cfg job": (["--cfg", "job"], {}),
    "TAB after `saelab pretrain.`": (["-sc", "query=bash"], {"COMP_LINE": "saelab pretrain.",
                                                             "COMP_POINT": "16"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    exe = shutil.which("saelab") or sys.exit("saelab is not installed (pip install -e .)")
    print(f"median of {args.repeat} runs, each a new process ({exe})")
    for name, (argv, env) in COMMANDS.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            proc = subprocess.run([exe, *argv], capture_output=True, env={**os.environ, **env})
            times.append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(f"{name} failed: {proc.stderr.decode()[-500:]}")
        print(f"  {name:<32} {statistics.median(times):6.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
