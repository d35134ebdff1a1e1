"""The engine stays mypy --strict clean (configured in pyproject.toml)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_engine_is_mypy_strict_clean() -> None:
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "engine")])
    assert status == 0, stdout + stderr
