"""A domU is a sandbox: what its programs see, and every way out they try, fails."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from channels import images
from channels.shm import create_segment, unlink_segment
from tests.integration.conftest import REPO, RUN, domain_info, hyperctl

pytestmark = pytest.mark.root


DEMO_IMAGE = Path("/var/lib/hyper/images/hyper-demo-xvda.img")  # configs/domu.yaml's disk


def test_create_the_demo_domain_and_look_inside(hypervisor: None) -> None:
    # What the toolstack makes for the demo's disk (its folders too), to be removed after.
    made = [p for p in (*reversed(DEMO_IMAGE.parents), DEMO_IMAGE) if not p.exists()]
    hyperctl("create", str(REPO / "configs" / "domu.yaml"))
    try:
        out = hyperctl(
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "hostname; id -u; cat /proc/self/uid_map; ip -o link; ls -A /dev/shm; ps -e",
        ).out.splitlines()
        assert out[0] == "demo"
        uid = int(out[1])
        inside, host, _count = (int(x) for x in out[2].split())
        assert uid != 0
        assert host + (uid - inside) != 0, "the workload must not be root on the host"
        links = [line for line in out[3:] if line[:1].isdigit() and ": " in line]
        assert [line.split(": ")[1] for line in links] == ["lo", "eth0"], "and its one vif"
        ps = out[3 + len(links) :]
        assert ps[0].split()[0] == "PID", "/dev/shm must be empty, so ls prints nothing"
        commands = sorted(line.split()[-1] for line in ps[1:])
        # The kernel, its fork server and disk's FUSE server, the init, the shell running ps.
        own = {"hyper-kernel", "hyper-forksrv", "hyper-blkfront", "hyper-init", "sh", "ps"}
        assert set(commands) <= own, commands
        assert len(ps) - 1 <= 8, "only the domain's own few processes are visible"

        listed = hyperctl("list").out
        assert "Domain-0" in listed and "demo" in listed
        domid = domain_info("demo")["domid"]  # type: ignore[index]
        home = hyperctl("store", "ls", f"/local/domain/{domid}").out
        assert f'/local/domain/{domid}/name = "demo"' in home
        assert f"/local/domain/{domid}/control/feature-poweroff" in home
    finally:
        hyperctl("destroy", "demo", check=False)
        images.remove(made)


def test_exec_passes_stdin_stdout_stderr_and_status(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    result = hyperctl(
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo oops >&2; exit 3",
        input="hello\n",
        check=False,
    )
    assert (result.status, result.out, result.err) == (3, "HELLO\n", "oops\n")


@pytest.fixture
def host_shm_object() -> Iterator[str]:
    name = f"hyper.escape-test.{os.getpid()}"
    create_segment(name, 4096, mode=0o666)
    yield name
    unlink_segment(name)


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[socket.socket]]]:
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


ESCAPES = r"""
import os, socket, sys, signal
tries = {}
def attempt(what, fn):
    try:
        fn()
        tries[what] = "ESCAPED"
    except OSError as e:
        tries[what] = type(e).__name__
attempt("host shm", lambda: open("/dev/shm/" + sys.argv[1], "rb"))
attempt("own ring", lambda: open("/dev/shm/" + sys.argv[2], "rb"))
attempt("own ring via /proc/1", lambda: open("/proc/1/root/dev/shm/" + sys.argv[2], "rb"))
attempt("toolstack", lambda: socket.socket(socket.AF_UNIX).connect(sys.argv[3]))
attempt("toolstack via /proc/1",
        lambda: socket.socket(socket.AF_UNIX).connect("/proc/1/root" + sys.argv[3]))
attempt("write /usr", lambda: open("/usr/hyper-escape", "w"))
attempt("write /root", lambda: open("/root/hyper-escape", "w"))
attempt("write /etc", lambda: open("/etc/hyper-escape", "w"))
attempt("signal kernel", lambda: os.kill(1, signal.SIGKILL))
attempt("signal hyperd", lambda: os.kill(int(sys.argv[4]), signal.SIGKILL))
attempt("host tcp", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[5])), 2))
for what, outcome in tries.items():
    print(f"{what}: {outcome}")
"""


def test_escape_attempts_all_fail(
    make_domain: Callable[..., str],
    host_shm_object: str,
    host_listener: tuple[int, list[socket.socket]],
) -> None:
    name = make_domain()
    info = domain_info(name)
    assert info is not None
    hyperd_pid = int(RUN.pidfile.read_text().split()[0])
    port, accepted = host_listener
    out = hyperctl(
        "exec",
        name,
        "--",
        "python3",
        "-c",
        ESCAPES,
        host_shm_object,
        info["store"]["segment"],
        str(RUN.toolstack_socket),
        str(hyperd_pid),
        str(port),
    ).out
    outcomes = dict(line.split(": ", 1) for line in out.splitlines())
    assert len(outcomes) == 11, out
    escaped = [what for what, outcome in outcomes.items() if outcome == "ESCAPED"]
    assert not escaped, out
    assert outcomes["host tcp"] == "ConnectionRefusedError"
    assert not accepted, "the host listener must never see a connection from the domain"
    os.kill(hyperd_pid, 0)  # still alive
    assert not Path("/usr/hyper-escape").exists()
    assert hyperctl("exec", name, "--", "true").status == 0, "the domain itself still works"


def test_exec_leaves_the_callers_environment_and_terminal_behind(
    make_domain: Callable[..., str],
) -> None:
    name = make_domain()
    env = dict(
        line.split("=", 1)
        for line in hyperctl("exec", name, "--", "env").out.splitlines()
        if "=" in line
    )
    assert set(env) <= {"PATH", "HOME", "TERM", "LANG"}, env
    assert env["HOME"] == "/tmp"
    # Run from a pipe, the command gets no terminal at all (and none of the caller's).
    assert hyperctl("exec", name, "--", "tty", check=False).out.strip() == "not a tty"


def test_exec_starts_in_the_domains_tmp_not_the_hosts(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """The command's working directory is the domain's /tmp. nsenter's ``--wd=/tmp`` opened
    the host's /tmp before entering the domain and handed the command that: through ``.`` and
    ``..`` it reached the host's file system (a fio state file landed in the host's /tmp)."""
    name = make_domain()
    probe = f"hyper-escape-probe-{os.getpid()}"
    script = f"test . -ef /tmp && touch {probe} && ls -a . .."
    result = hyperctl("exec", name, "--", "sh", "-c", script, check=False)
    assert result.status == 0, result
    assert not (Path("/tmp") / probe).exists(), "the command wrote into the host's /tmp"
    assert "pytest-of-root" not in result.out
