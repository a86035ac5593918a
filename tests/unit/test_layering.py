"""The import graph reads top to bottom like Xen's tree, and nothing imports upward.

    hyper      the user's tools (xl's role): hyperctl, cleanup
    dom0 domu  the domains, beside each other: toolstack and backends; the frontends
    backends   the backend drivers, which dom0 runs and so may a driver domain (a domU)
    xenstored  the store, which dom0 runs and so may a stub domain (a domU)
    hyperd     the hypervisor
    channels   the public ABI every layer shares: rings, protocols, hypercalls, the store's
               wire, the toolstack's requests and the domain config they carry

A domain reaches the hypervisor only by hypercall, as a Xen guest does: dom0 and domU code
imports the hypervisor's ABI (``channels``), never its code, just as Linux includes Xen's
public headers and nothing else of Xen. Every import counts, the ones inside functions too.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Each package, and the packages its modules may import (besides the standard library and
#: third-party ones). The order is the layering, top first.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "hyper": frozenset({"hyper", "dom0", "domu", "backends", "xenstored", "hyperd", "channels"}),
    "dom0": frozenset({"dom0", "backends", "xenstored", "channels"}),
    "domu": frozenset({"domu", "backends", "xenstored", "channels"}),
    "backends": frozenset({"backends", "channels"}),
    "xenstored": frozenset({"xenstored", "channels"}),
    "hyperd": frozenset({"hyperd", "channels"}),
    "channels": frozenset({"channels"}),
}


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """Every module an AST imports, with its line, relative imports resolved against ``module``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def violations(package: str) -> list[str]:
    problems = []
    for path in modules_of(package):
        relative = path.relative_to(REPO)
        module = ".".join(relative.with_suffix("").parts)
        for line, name in imported_modules(ast.parse(path.read_text(encoding="utf-8")), module):
            top = name.split(".")[0]
            if top in MAY_IMPORT and top not in MAY_IMPORT[package]:
                problems.append(f"{relative}:{line}: {package} imports {name}")
    return problems


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_nothing_imports_against_the_layering(package: str) -> None:
    assert modules_of(package), f"{package}/ holds no module"
    problems = violations(package)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_package_hyper_installs_has_a_place_in_the_layering() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]["packages"]["find"]["include"]
    installed = {
        init.parent.name
        for pattern in patterns
        for init in REPO.glob(f"{pattern.rstrip('*')}*/__init__.py")
    }
    assert installed == set(MAY_IMPORT), "add the package to MAY_IMPORT, at its layer"


def test_the_check_sees_an_upward_import_inside_a_function() -> None:
    tree = ast.parse("def f():\n    from dom0.toolstack import Toolstack\n")
    assert imported_modules(tree, "channels.x") == [(2, "dom0.toolstack")]


def test_the_check_resolves_relative_imports() -> None:
    tree = ast.parse("from ..toolstack import Toolstack\nfrom . import firewall\n")
    assert [name for _, name in imported_modules(tree, "dom0.store.core")] == [
        "dom0.toolstack",
        "dom0.store",
    ]
