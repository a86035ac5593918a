"""The README stays true to the code: first screen, code map, config and CLI references.

The *first screen* is everything above the first ``## `` heading. It must fit in 40 lines and
hold exactly two commands in code blocks: the demo and the tests, each an executable script, the
second being what CI (``.ci/run``) runs. The code map must name only paths that exist, and every
package and module of ``hyper/``, ``dom0/``, ``domu/``, ``hyperd/``, ``channels/`` and ``bench/``.
The config reference must list every config key and no other; the CLI reference every ``hyperctl``
subcommand and option in ``build_parser()`` and no other.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from backends.netback.datapath import GSO_BY_FRAGS, MIN_GSO_SIZE
from channels import blkif as B
from channels import netif as N
from channels.config import DiskConfig, DomainConfig, P9Config, VifConfig
from channels.grants import BAD_GREF_BUDGET
from channels.paths import RunDir
from domu.sandbox import PTYS_MAX
from hyper.cli import CONTAINMENT, build_parser
from hyperd.budget import HYPERCALL_COST, HYPERCALL_RATE, LOG_MAX, LOG_RATE
from xenstored.quota import Quota

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PACKAGES = ("channels", "hyperd", "backends", "dom0", "domu", "hyper", "bench")
FIRST_SCREEN_LINES = 40

#: A code block, with its language (commands are in a shell's, ```sh, or one that names none).
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_CODE_MAP_LINE = re.compile(r"^- `([^`]+)`: \S")
_CLI_LINE = re.compile(r"^- `hyperctl ([^`]+)`: \S")
_OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def readme() -> str:
    return README.read_text(encoding="utf-8")


def first_screen() -> str:
    return readme().split("\n## ", 1)[0]


def section(title: str) -> str:
    """The body of the ``## title`` section, up to the next ``## `` heading."""
    for part in readme().split("\n## ")[1:]:
        heading, _, body = part.partition("\n")
        if heading.strip() == title:
            return body
    raise AssertionError(f"README.md has no '## {title}' section")


def commands(text: str) -> list[str]:
    """Every non-blank, non-comment line inside the shell code blocks of ``text`` (not the
    Python, YAML or output ones)."""
    return [
        line.strip()
        for language, block in _FENCE.findall(text)
        if language in ("", "sh", "bash")
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def code_map() -> list[str]:
    return [
        match[1]
        for line in section("Code map").splitlines()
        if (match := _CODE_MAP_LINE.match(line))
    ]


def cli_entries() -> dict[str, str]:
    """Subcommand name -> its synopsis line in the CLI reference (``create [-c] ... FILE``)."""
    entries: dict[str, str] = {}
    for line in section("hyperctl reference").splitlines():
        match = _CLI_LINE.match(line)
        if match:
            synopsis = match[1]
            name = synopsis.split()[0]
            assert name not in entries, f"hyperctl {name} is described twice"
            entries[name] = synopsis
    return entries


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def table_keys(body: str, header: str) -> list[str]:
    """The first-column keys of the markdown table whose header row starts with ``header``."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    keys = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        keys.append(line.split("|")[1].strip().strip("`"))
    return keys


# -- first screen --------------------------------------------------------------------------------


def test_first_screen_fits_on_one_screen() -> None:
    lines = first_screen().splitlines()
    assert len(lines) <= FIRST_SCREEN_LINES, f"{len(lines)} lines above the first '## ' heading"


def test_first_screen_has_exactly_the_two_commands() -> None:
    assert commands(first_screen()) == ["sudo scripts/demo.sh", "sudo scripts/test.sh"]


@pytest.mark.parametrize("command", commands(first_screen()))
def test_first_screen_commands_are_executable_scripts(command: str) -> None:
    script = REPO / command.split()[-1]
    assert script.is_file(), f"{command}: {script} does not exist"
    assert os.access(script, os.X_OK), f"{command}: {script} is not executable"


def test_ci_runs_the_readme_test_command() -> None:
    test_script = commands(first_screen())[-1].split()[-1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^exec bash {re.escape(test_script)}\b", ci, re.MULTILINE), ci


# -- code map -----------------------------------------------------------------------------------


def test_every_path_in_the_code_map_exists() -> None:
    paths = code_map()
    assert paths, "the code map names no path"
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"the README's code map names paths that do not exist: {missing}"


def test_code_map_names_each_path_once() -> None:
    paths = code_map()
    assert sorted(set(paths)) == sorted(paths), "a path is named twice in the code map"


def test_code_map_names_every_package_and_module() -> None:
    named = set(code_map())
    expected: set[str] = set()
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            expected.add(f"{init.parent.relative_to(REPO)}/")
            for module in init.parent.glob("*.py"):
                if module.name != "__init__.py":
                    expected.add(str(module.relative_to(REPO)))
    missing = sorted(expected - named)
    assert not missing, f"add a line to the README's code map for each of: {missing}"


# -- config reference ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "model"),
    [
        ("key", DomainConfig),
        ("vif key", VifConfig),
        ("disk key", DiskConfig),
        ("p9 key", P9Config),
    ],
)
def test_config_reference_lists_exactly_the_model_keys(header: str, model: type[BaseModel]) -> None:
    keys = table_keys(section("Configuration reference"), header)
    assert keys == list(model.model_fields), f"the '{header}' table disagrees with {model.__name__}"


# -- CLI reference ------------------------------------------------------------------------------


def test_cli_reference_describes_exactly_the_subcommands() -> None:
    assert sorted(cli_entries()) == sorted(subcommands())


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_cli_reference_shows_every_option(name: str) -> None:
    synopsis = cli_entries().get(name, "")
    shown = set(re.findall(r"[\w-]+", synopsis))
    wanted: set[str] = set()
    for action in subcommands()[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        wanted.update(action.option_strings)
        if not action.option_strings and action.choices:
            wanted.update(str(choice) for choice in action.choices)
    missing = sorted(wanted - shown)
    assert not missing, f"hyperctl {name}: the README's synopsis lacks {missing}: {synopsis!r}"


def test_cli_reference_shows_no_option_that_does_not_exist() -> None:
    for name, synopsis in cli_entries().items():
        parser = subcommands()[name]
        real = {s for action in parser._actions for s in action.option_strings}
        invented = sorted(set(_OPTION.findall(synopsis)) - real)
        assert not invented, f"hyperctl {name}: the README shows options it lacks: {invented}"


# -- logs, state and tests ----------------------------------------------------------------------


def test_logs_and_state_section_names_the_real_paths() -> None:
    run = RunDir(Path("/run/hyper"), Path("/var/log/hyper"))
    body = section("Logs and runtime state")
    for path in (run.root, run.logs):
        assert f"`{path}/`" in body, path
    for name in (run.pidfile.name, run.toolstack_socket.name, f"{run.rootfs.name}/"):
        assert f"`{name}`" in body, name
    for log in ("hyperd", "dom0"):
        assert f"`{run.log(log).name}`" in body, log


def test_example_test_ids_exist() -> None:
    examples = [c for c in commands(readme()) if "pytest" in c]
    assert examples, "the README shows no way to run one test"
    for command in examples:
        target = next(word for word in command.split() if word.startswith("tests/"))
        path, _, name = target.partition("::")
        assert (REPO / path).is_file(), command
        if name:
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), command


# -- containment ---------------------------------------------------------------------------------


def test_the_sandbox_section_says_what_hyperctl_says_a_domu_can_and_cannot_do() -> None:
    assert CONTAINMENT.strip() in section("The sandbox")
    assert CONTAINMENT in build_parser().format_help()


def test_the_containment_text_states_the_limits_the_code_enforces() -> None:
    quota = Quota()
    facts = [
        f"at most {PTYS_MAX})",
        f"reads at {LOG_RATE >> 10} KiB/s and rotates at {LOG_MAX >> 10} KiB",
        f"{quota.nodes} nodes and {quota.memory >> 20} MiB",
        f"{quota.watches} watches",
        f"{quota.transactions} transactions that together hold at most {quota.memory >> 20} MiB",
        f"live at most {quota.transaction_lifetime:g} s",
        f"costs {HYPERCALL_COST[False]:g} of {HYPERCALL_RATE:g} credits",
        f"nothing {HYPERCALL_COST[True]:g};",
        f"{BAD_GREF_BUDGET} bad grant refs",
        f"{N.MAX_GRANT_PAGES * N.PAGE_SIZE >> 20} MiB for a vif",
        f"{B.MAX_GRANT_PAGES * N.PAGE_SIZE >> 20} MiB for a vbd",
        f"outside {MIN_GSO_SIZE}-{GSO_BY_FRAGS - 1}",
    ]
    text = " ".join(CONTAINMENT.split())
    assert [fact for fact in facts if fact not in text] == []
