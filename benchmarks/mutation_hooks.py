"""What mutmut cannot see by itself: the clubsnap processes the tests start.

Most CLI-level tests run ``python -m engine`` in a child process. mutmut learns which
tests reach a function from hits its trampolines record in the process they run in, so
a function reached only through a child would count as reached by no test, and its
mutants would never run. Two halves close that gap during mutmut's stats run:

- in each child (benchmarks/mutation_child.py), the hits are written to a file when
  the process exits;
- in the test process (this module as a pytest plugin), each test's teardown adds the
  children's hits to the test's own before mutmut files them under that test.

The plugin also orders each mutant's tests fastest first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from benchmarks.mutation_child import HITS, stats_run


def pytest_configure(config: pytest.Config) -> None:
    if stats_run() and HITS not in os.environ:
        os.environ[HITS] = tempfile.mkdtemp(prefix="mutmut-hits-")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if not (stats_run() and os.environ.get(HITS)):
        return
    from mutmut.state import state

    for hits in Path(os.environ[HITS]).glob("*.json"):
        state()._stats.update(json.loads(hits.read_text()))
        hits.unlink()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With a mutant switched on, run the fastest of its tests first: the first failure
    ends the run (mutmut passes -x), and most mutants die in the first test that reaches
    them, so the order decides most of the hours a full run takes."""
    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "fail", "mutant_generation"):
        return
    from mutmut.state import state

    durations = state().duration_by_test
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
