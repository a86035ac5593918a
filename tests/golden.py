"""Golden files (tests/golden/): what a test's output must equal, rewritten after an intended
change with ``HYPER_UPDATE_GOLDEN=1`` (then review the diff)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The schemas of hyperctl's --json outputs, one file per command.
JSON_SCHEMAS = Path(__file__).resolve().parent / "golden" / "json"


def assert_matches_golden(actual: str, golden: Path) -> None:
    """``actual`` is ``golden``'s text; with HYPER_UPDATE_GOLDEN=1 it becomes it first."""
    if os.environ.get("HYPER_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"no golden file {golden}; run with HYPER_UPDATE_GOLDEN=1"
    assert actual == golden.read_text()


def shape(value: Any) -> Any:
    """The schema of a JSON value: a type's name, an object's keys' shapes, a list's last
    element's shape (the test's domain's, in a list of domains; an empty list: [])."""
    if isinstance(value, dict):
        return {key: shape(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [shape(value[-1])] if value else []
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


def assert_matches_schema(value: Any, command: str) -> None:
    """``value``'s shape is the golden schema of ``command``'s --json output."""
    actual = json.dumps(shape(value), indent=2) + "\n"
    assert_matches_golden(actual, JSON_SCHEMAS / f"{command}.json")
