"""hyperd killed (SIGKILL): the domains run on, and the next hyperd re-adopts them.

The data plane (rings, doorbells, TAPs, loop devices) needs no hyperd, and the fd keeper holds
hyperd's end of every hypercall socket, so no domain sees its hypervisor go. A hyperd started
afterwards rebuilds its tables from the state file and takes the sockets back: the same domains
with the same domids, which `exec` and `destroy` work on as before, and a domain that died
meanwhile is cleaned up as if hyperd had seen it die.

``hyperctl exec`` asks hyperd where a domain is, so to act inside a domain while no hyperd runs,
a test starts a shell there beforehand (``DomainShell``) and feeds it commands.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    REPO,
    RUN,
    alive,
    domain_info,
    domains,
    hyperctl,
    kill_hyperd,
    leftovers,
    wait_for,
)
from tests.integration.test_block import attached_loops, disk, sha256_of
from tests.integration.test_faults import store_nodes_of, taps_of

pytestmark = pytest.mark.root

MiB = 1 << 20


class DomainShell:
    """A shell in a domain, started while hyperd runs, that runs each line the test sends and
    answers with the output and the exit status."""

    SCRIPT = 'while IFS= read -r line; do sh -c "$line" </dev/null 2>&1; echo "__status $?"; done'

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hyper.cli", "exec", name, "--", "sh", "-c", self.SCRIPT],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        output: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.name}: no answer to {command!r}") from None
            if line is None:
                raise AssertionError(f"{self.name}: the shell ended: {output}")
            if line.startswith("__status "):
                return int(line.split()[1]), "\n".join(output)
            output.append(line)

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def shells() -> Iterator[list[DomainShell]]:
    opened: list[DomainShell] = []
    yield opened
    for shell in opened:
        shell.close()


def create(tmp_path: Path, name: str, body: str = "") -> dict[str, Any]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"name: {name}\n{body}")
    hyperctl("create", str(config))
    return listed(name)


def listed(name: str) -> dict[str, Any]:
    info = domain_info(name)
    assert info is not None, f"{name} is not listed"
    return info


def on_lan(bridge: str, ip: str, image: Path) -> str:
    return f"vif:\n  - bridge: {bridge}\n    ip: {ip}/24\ndisk:\n" + disk(image, size="64M")


WRITE = "dd if={source} of=/dev/xvda bs=1M count=8 oflag=direct conv=fsync,notrunc"
READ = "dd if=/dev/xvda of=/dev/null bs=1M count=8 iflag=direct"
# Up to 5 s for iperf3 -D to listen, checked inside the domain.
LISTENING = "for i in $(seq 50); do ss -ltn | grep -q :5201 && exit 0; sleep 0.1; done; exit 1"


def traces_of(domid: int, pid: int, image: Path) -> list[str]:
    """Everything of one domain on the host: it must all go when the domain does."""
    found = [p.name for p in Path("/dev/shm").iterdir() if f"hyper.d{domid}." in p.name]
    found += [str(g) for g in Path("/sys/fs/cgroup").glob(f"*/hyper/dom{domid}")]
    found += [f"loop {loop}" for loop in attached_loops(image)]
    found += [f"tap {name}" for name in taps_of(domid)]
    found += [f"store {path}" for path in store_nodes_of(domid)]
    found += [f"process {pid}"] if alive(pid) else []
    found += [f"listed as dom{domid}"] if any(d["domid"] == domid for d in domains()) else []
    return found


def test_domains_pass_traffic_without_hyperd_and_the_next_one_adopts_them(
    own_hypervisor: None, tmp_path: Path, lan: tuple[str, str], shells: list[DomainShell]
) -> None:
    bridge, net = lan
    images = {name: tmp_path / f"{name}.img" for name in ("ra", "rb")}
    a = create(tmp_path, "ra", on_lan(bridge, f"{net}.2", images["ra"]))
    b = create(tmp_path, "rb", on_lan(bridge, f"{net}.3", images["rb"]))
    shells += [DomainShell("ra"), DomainShell("rb")]
    in_a, in_b = shells
    assert in_b.run(f"iperf3 -s -D && {LISTENING}")[0] == 0
    assert in_a.run("true")[0] == 0  # its session is set up: exec asks hyperd only to start

    kill_hyperd()

    for reverse in ("", "-R"):
        status, out = in_a.run(f"iperf3 -c {net}.3 -t 2 {reverse}")
        assert status == 0, out
    status, out = in_a.run(f"ping -c 3 -W 5 {net}.3")
    assert status == 0, out
    status, out = in_b.run(
        "head -c 8M /dev/urandom > /tmp/data && sha256sum /tmp/data && "
        + WRITE.format(source="/tmp/data")
        + f" && {READ}"
    )
    assert status == 0 and "8388608 bytes" in out, out
    written = out.split()[0]
    # Meanwhile hyperctl says what is wrong rather than waiting for a hyperd that is not there.
    down = hyperctl("list", check=False, timeout=20)
    assert down.status == 1 and "hyperd" in down.err and "hyperctl start" in down.err, down

    started = hyperctl("start")
    assert "re-adopted 2 domain(s)" in started.out, started
    assert "already running" in hyperctl("start").out

    assert {(d["domid"], d["name"], d["pid"]) for d in domains() if d["domid"]} == {
        (a["domid"], "ra", a["pid"]),
        (b["domid"], "rb", b["pid"]),
    }
    assert hyperctl("exec", "ra", "--", "ping", "-c", "1", "-W", "5", f"{net}.3").status == 0
    assert hyperctl("exec", "rb", "--", "hostname").out.strip() == "rb"
    # dom0 ran on: it was not introduced to the domains again (which would remake their devices).
    dom0_log = RUN.log("dom0").read_text()
    assert dom0_log.count("(ra) introduced") == dom0_log.count("(rb) introduced") == 1

    hyperctl("destroy", "ra")
    wait_for(
        lambda: not traces_of(a["domid"], a["pid"], images["ra"]),
        10,
        f"dom{a['domid']}'s shm, cgroup, loop device, TAP, store nodes and processes to go",
    )
    wait_for(in_a.ended, 10, "the shell in the destroyed domain to end")

    hyperctl("halt")
    wait_for(lambda: not leftovers(), 30, "the halt to leave nothing behind")
    assert sha256_of(images["rb"], 8 * MiB) == written


def test_a_domain_that_died_without_hyperd_is_cleaned_up_by_the_next(
    own_hypervisor: None, tmp_path: Path, lan: tuple[str, str]
) -> None:
    bridge, net = lan
    image = tmp_path / "victim.img"
    victim = create(tmp_path, "victim", on_lan(bridge, f"{net}.2", image))
    survivor = create(tmp_path, "survivor")

    kill_hyperd()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(victim["pid"]), 10, "the victim's kernel to die")
    # `create` is how a user starts the hypervisor again: it re-adopts, then creates.
    create(tmp_path, "newcomer")

    wait_for(
        lambda: not traces_of(victim["domid"], victim["pid"], image),
        10,
        f"dom{victim['domid']}'s shm, cgroup, loop device, TAP, store nodes to go",
    )
    assert listed("survivor")["domid"] == survivor["domid"]
    assert hyperctl("exec", "survivor", "--", "true").status == 0

    # With hyperd killed again, `halt` starts it to stop everything.
    kill_hyperd()
    hyperctl("halt")
    wait_for(lambda: not leftovers(), 30, "the halt to leave nothing behind")
