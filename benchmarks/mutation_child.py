"""The child half of benchmarks/mutation_hooks.py, imported by ``mutants/sitecustomize.py``
in every Python process whose path starts at mutants/ (the tests' CLI runs). Kept free of
pytest: every CLI run a test makes imports it.

A child needs mutmut's configuration, which mutmut reads from the working directory;
tests often run the CLI elsewhere, so it is read here, from the project root. During
mutmut's stats run the functions the child reached are written to a file at exit, for
the test process to claim.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

HITS = "CLUBSNAP_MUTATION_HITS"
_PROJECT = Path(__file__).resolve().parents[2]  # mutants/benchmarks/ -> the project root


def stats_run() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


def child_started() -> None:
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    cwd = os.getcwd()
    os.chdir(_PROJECT)
    try:
        from mutmut.configuration import config

        config()
    finally:
        os.chdir(cwd)
    if stats_run() and os.environ.get(HITS):
        atexit.register(_write_hits, Path(os.environ[HITS]))


def _write_hits(directory: Path) -> None:
    from mutmut.state import state

    if state()._stats:
        (directory / f"{os.getpid()}.json").write_text(json.dumps(sorted(state()._stats)))
