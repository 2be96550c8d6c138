"""The tree passes ruff with the rules in pyproject.toml (`make lint` also runs mypy; .ci/run calls it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.process
@pytest.mark.skipif(not RUFF.exists() and not shutil.which("ruff"), reason="ruff is not installed (pip install -e '.[dev]')")
def test_ruff_passes():
    ruff = str(RUFF) if RUFF.exists() else "ruff"
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
