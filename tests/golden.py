"""Golden files (tests/golden/): what a test's output must equal, rewritten after an intended
change with ``HYPER_UPDATE_GOLDEN=1`` (then review the diff)."""

from __future__ import annotations

import functools
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
    """The schema of a JSON value: a type's name, an object's keys' shapes, a list's one
    shape that every element has (merged: an object's keys from all of them, ``int|null``
    for a field that is sometimes null; an empty list: [])."""
    if isinstance(value, dict):
        return {key: shape(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        shapes = [shape(v) for v in value]
        return [functools.reduce(_merged, shapes)] if shapes else []
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


def _merged(a: Any, b: Any) -> Any:
    """One shape for two elements' shapes: an object's keys from both (``absent`` joins a
    key's type where one of them lacks it), a list's elements merged, two types as ``a|b``
    (an object and a type: ``{"one of": [...]}``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merged(a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())}
    if isinstance(a, list) and isinstance(b, list):
        return [_merged(a[0], b[0])] if a and b else a or b
    if a == b or not isinstance(a, str) or not isinstance(b, str):
        return a if b == ABSENT or a == b else b if a == ABSENT else {"one of": [a, b]}
    return "|".join(sorted({*a.split("|"), *b.split("|")}))


ABSENT = "absent"


def assert_matches_schema(value: Any, command: str) -> None:
    """``value``'s shape is the golden schema of ``command``'s --json output."""
    actual = json.dumps(shape(value), indent=2) + "\n"
    assert_matches_golden(actual, JSON_SCHEMAS / f"{command}.json")
