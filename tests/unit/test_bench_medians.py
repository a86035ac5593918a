"""bench/net.py --runs: each ratio to the same run's veth, and its median over the runs."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from bench.net import DOMU, PEER, VETH, medians, medians_table


def path(single: float, parallel: float, ping_ms: float) -> dict[str, Any]:
    """A path's figures as bench/net.py records them (Gbit/s, ms)."""
    return {
        "single": {"bits_per_second": single * 1e9},
        "parallel": {"bits_per_second": parallel * 1e9},
        "ping": {"avg_ms": ping_ms},
    }


def run(peer: dict[str, Any], veth: dict[str, Any] | None = None) -> dict[str, Any]:
    veth = veth or path(20, 40, 0.05)
    return {"paths": {VETH: veth, PEER: peer, DOMU: path(8, 12, 0.4)}}


RUNS = [
    run(path(10, 16, 0.2)),  # 0.5x, 0.4x, 4x
    run(path(12, 12, 0.3), veth=path(20, 30, 0.05)),  # 0.6x, 0.4x, 6x
    run({"error": "iperf3 failed"}),
]


def test_each_ratio_is_taken_against_its_own_runs_veth_and_a_failed_run_is_left_out() -> None:
    found = medians(RUNS)[PEER]
    assert [round(r, 3) if r is not None else None for r in found["single"]["runs"]] == [
        0.5,
        0.6,
        None,
    ]
    assert round(found["single"]["median"], 3) == 0.55
    assert round(found["parallel"]["median"], 3) == 0.4
    assert round(found["rtt"]["median"], 3) == 5.0


def test_the_table_judges_the_medians_against_the_targets() -> None:
    console = Console(width=250, record=True)
    console.print(medians_table({"runs": RUNS, "medians": medians(RUNS)}))
    text = console.export_text()
    peer_row = next(line for line in text.splitlines() if PEER in line)
    assert "0.55x (0.50, 0.60, -)" in peer_row
    assert "met" in peer_row and "missed" not in peer_row
    domu_row = next(line for line in text.splitlines() if DOMU in line)
    assert "missed: RTT" not in domu_row  # 8x against the 12x allowed
    assert "0.40x (0.40, 0.40, 0.40)" in domu_row  # 8 of 20 Gbit/s, every run


def test_a_median_below_its_target_is_named_as_missed() -> None:
    slow = [run(path(10, 10, 0.4)) for _ in range(3)]  # 0.5x, 0.25x, 8x veth
    console = Console(width=250, record=True)
    console.print(medians_table({"runs": slow, "medians": medians(slow)}))
    peer_row = next(line for line in console.export_text().splitlines() if PEER in line)
    assert "missed: -P 4 0.25x, RTT 8.0x" in peer_row
