"""Run a command and write its own wall time, CPU time and peak RSS as JSON.

Linux keeps a process's peak RSS across fork and exec, so a command started straight
from a large benchmark process would report that process's peak. Started from this
small launcher (a fresh exec), the command's figure is its own.

Usage: python -m benchmarks.measure OUT.json COMMAND [ARG...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> None:
    out, command = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    with open(out, "w") as handle:
        json.dump({"exit_code": os.waitstatus_to_exitcode(status), "wall_s": round(time.monotonic() - started, 3),
                   "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                   "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}, handle)


if __name__ == "__main__":
    main()
