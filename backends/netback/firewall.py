"""Frames between the ports of a bridge hyper made, let through the host's firewall.

With ``br_netfilter`` loaded and ``net.bridge.bridge-nf-call-iptables`` at 1 (Docker sets both),
a frame bridged from one port to another goes through iptables' FORWARD chain as if routed,
whatever the bridge's own ``nf_call_iptables`` option says (the kernel checks either one).
Where FORWARD drops by default (Docker sets that policy too, as on GitHub's runners), frames
between two domains, or between a domain and a host interface on its bridge, are dropped.

So, as Docker does for ``docker0`` and libvirt for its networks, each bridge hyper makes gets one
rule at the top of FORWARD in iptables and ip6tables (whichever the host has), marked with a
comment, accepting what enters and leaves by that bridge::

    -I FORWARD -i <bridge> -o <bridge> -m comment --comment hyper-bridge -j ACCEPT

It goes when the bridge goes, and ``hyperctl cleanup`` removes every rule so marked. Traffic
that leaves the bridge (routed or NATed elsewhere) is the host's policy, as with xl. A bridge
hyper did not make is used as found: its rules are its owner's.

The tools are run as commands, as Docker and libvirt run them: the rule must land in the same
table and chain as the policy it overrides, whichever backend (nf_tables or legacy) the host's
iptables uses, and only the host's own iptables knows that. A host without iptables has no
FORWARD policy of iptables' to override. A failing command is logged, not raised: a bridge
without the rule still works wherever the firewall does not drop.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger(__name__)

COMMENT = "hyper-bridge"
TOOLS = ("iptables", "ip6tables")
TIMEOUT = 30.0  # seconds: iptables waits for the xtables lock (-w) that long at most


def _rule(bridge: str) -> list[str]:
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-w", str(int(TIMEOUT)), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 5,
        check=False,
    )


def _tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool)]


def allow(bridge: str) -> None:
    """Accept frames between ``bridge``'s ports in FORWARD (once, at the top)."""
    for tool in _tools():
        if _run(tool, "-C", "FORWARD", *_rule(bridge)).returncode == 0:
            continue
        done = _run(tool, "-I", "FORWARD", "1", *_rule(bridge))
        if done.returncode != 0:
            log.warning("%s: cannot accept bridge %s's frames: %s", tool, bridge, done.stderr)


def revoke(bridge: str) -> None:
    """Remove ``bridge``'s rule (every copy of it)."""
    for tool in _tools():
        for _ in range(16):  # one, unless something inserted it again meanwhile
            if _run(tool, "-D", "FORWARD", *_rule(bridge)).returncode != 0:
                break


def ours() -> list[tuple[str, str]]:
    """(tool, bridge) of every rule hyper put in FORWARD."""
    found = []
    for tool in _tools():
        listed = _run(tool, "-S", "FORWARD")
        for line in listed.stdout.splitlines():
            words = line.split()
            if COMMENT in words and "-i" in words:
                found.append((tool, words[words.index("-i") + 1]))
    return found


def revoke_all() -> list[str]:
    """For cleanup: remove every rule hyper put in FORWARD; the bridges they named."""
    bridges = sorted({bridge for _, bridge in ours()})
    for bridge in bridges:
        revoke(bridge)
    return bridges
