"""Golden files (tests/golden/): what a test's output must equal, rewritten after an intended
change with ``HYPER_UPDATE_GOLDEN=1`` (then review the diff)."""

from __future__ import annotations

import os
from pathlib import Path


def assert_matches_golden(actual: str, golden: Path) -> None:
    """``actual`` is ``golden``'s text; with HYPER_UPDATE_GOLDEN=1 it becomes it first."""
    if os.environ.get("HYPER_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"no golden file {golden}; run with HYPER_UPDATE_GOLDEN=1"
    assert actual == golden.read_text()
