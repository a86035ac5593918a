"""hyperctl on a real terminal (issue 17, item 6): tmux runs it in a pseudo-terminal of its own,
types into it (send-keys) and reads its screen (capture-pane). `top` shows the domains until q,
and gives the terminal back as it found it; a command that waits shows its progress there, and
takes it away when done; in a pipe it shows none."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import REPO, domain_info, hyperctl, wait_for

pytestmark = pytest.mark.root

SESSION = "t"


class Terminal:
    """A tmux server of the test's own, 160 x 40, running one hyperctl command in its one pane;
    the pane stays after the command, saying ``[exit N MODE]``: its status, and whether the
    terminal is back in canonical mode (``stty``'s ``icanon``, which `top`'s key reading turns
    off: ``-icanon``)."""

    def __init__(self) -> None:
        self.socket = f"hyper-test-{os.getpid()}"

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def run(self, *args: str) -> None:
        command = shlex.join(
            ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "hyper.cli", *args]
        )
        mode = "$(stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon)"
        shell = f'{command}; status=$?; echo "[exit $status {mode}]"; exec sleep 600'
        self.tmux(
            "new-session", "-d", "-s", SESSION, "-x", "160", "-y", "40", "-c", str(REPO), shell
        )

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", SESSION)

    def shows(self, *texts: str, timeout: float = 30.0) -> str:
        """The screen, once it holds every one of ``texts``."""

        def screen() -> str | None:
            now = self.screen()
            return now if all(text in now for text in texts) else None

        try:
            return str(wait_for(screen, timeout, f"the terminal to show {texts}"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it shows:\n{self.screen()}") from None

    def type(self, keys: str) -> None:
        self.tmux("send-keys", "-t", SESSION, "-l", keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        term.close()


def test_top_shows_each_domain_until_q_and_gives_the_terminal_back(
    terminal: Terminal, make_domain: Callable[..., str]
) -> None:
    name = make_domain()
    terminal.run("top", "-d", "0.3")

    screen = terminal.shows("NAME", name, "q quits")
    header = next(line for line in screen.splitlines() if "NAME" in line)
    assert header.split()[:3] == ["NAME", "STATE", "CPU(sec)"]
    row = next(line for line in screen.splitlines() if name in line)
    assert row.split()[1] in ("-b----", "r-----")

    terminal.type("q")
    terminal.shows("[exit 0 icanon]", timeout=10)  # quit, and cbreak undone


def test_a_waiting_shutdown_shows_its_progress_then_takes_it_away(
    terminal: Terminal, make_domain: Callable[..., str]
) -> None:
    name = make_domain()
    hyperctl("pause", name)  # a frozen domain cannot power off: dom0 destroys it at 4 s
    terminal.run("shutdown", "-w", "--timeout", "4", name)

    waiting = terminal.shows(f"waiting for {name} to shut down (destroyed after 4 s)")
    assert "0:00:0" in waiting  # the seconds so far

    final = terminal.shows("[exit 0 icanon]", timeout=30)
    assert f"{name} did not shut down in 4 s: destroyed" in final
    assert "waiting for" not in final
    assert domain_info(name) is None


def test_in_a_pipe_a_waiting_command_shows_no_progress(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    hyperctl("pause", name)

    result = hyperctl("shutdown", "-w", "--timeout", "2", name)

    assert result.err.splitlines() == [f"{name} did not shut down in 2 s: destroyed"]
    assert "\x1b" not in result.out + result.err
