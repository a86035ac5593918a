"""hyperctl's views for people (hyper/cli.py): the progress a waiting command shows on a terminal
and nowhere else, and which of `top`'s columns fit a terminal's width. The real terminal runs
in tests/integration/test_terminal.py (tmux); here rich's Console stands for one."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from hyper.cli import TOP_COLUMNS, _fitting, progress


def terminal(width: int = 100) -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=width), screen


def test_progress_on_a_terminal_counts_and_is_taken_away() -> None:
    console, screen = terminal()
    with progress("halting: destroying 3 domains", 3, console=console) as shown:
        assert shown.visible
        shown.update(done=2)
        during = screen.getvalue()
    assert "halting: destroying 3 domains" in during
    assert "2/3" in during
    assert screen.getvalue().endswith("\x1b[1A\x1b[2K")  # up a line, and erased: taken away


def test_progress_shows_nothing_where_there_is_no_terminal() -> None:
    screen = io.StringIO()
    console = Console(file=screen)  # a pipe: rich sees no terminal
    with progress("waiting", console=console) as shown:
        shown.update("still waiting")
        assert not shown.visible
    assert screen.getvalue() == ""


def test_force_color_does_not_make_a_pipe_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # which rich would take for a terminal
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress("waiting") as shown:
        assert not shown.visible
    assert pipe.getvalue() == ""


def test_top_keeps_the_leftmost_columns_that_fit() -> None:
    row = ["web", "-b----", "1.2", "0.5", "4096", "131072", "1"] + ["0"] * (len(TOP_COLUMNS) - 7)
    assert _fitting(TOP_COLUMNS, [row], 1000) == len(TOP_COLUMNS)
    # NAME (4+2), STATE (6+2), CPU(sec) (8+2): 24 characters hold three.
    assert _fitting(TOP_COLUMNS, [row], 24) == 3
    assert _fitting(TOP_COLUMNS, [row], 23) == 2
    assert _fitting(TOP_COLUMNS, [], 3) == 1  # NAME at least
