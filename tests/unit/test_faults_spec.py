"""Fault specs (channels/faults.py): what a user may write, what is refused with the key named,
and the decisions each frame or request meets, the same ones for the same seed."""

from __future__ import annotations

import pytest

from channels.errors import BadInput
from channels.faults import (
    BlockDice,
    BlockFaults,
    NetDice,
    NetFaults,
    flip,
    parse_block,
    parse_net,
)


def test_a_net_spec_parses_into_its_faults_and_prints_back() -> None:
    faults = parse_net("drop=30, corrupt=5%,delay=50ms,jitter=500us,dir=rx,seed=7")
    assert faults == NetFaults(drop=30.0, corrupt=5.0, delay=0.05, jitter=0.0005, dir="rx", seed=7)
    assert str(faults) == "drop=30,corrupt=5,delay=50ms,jitter=0.5ms,dir=rx,seed=7"
    assert parse_net(str(faults)) == faults
    assert not parse_net("") and not parse_net("seed=3")


def test_a_block_spec_parses_into_its_faults_and_prints_back() -> None:
    faults = parse_block("eio=100,sectors=2048-4095,latency=5ms,flush=fail,seed=1")
    assert faults == BlockFaults(
        eio=100.0, sectors=(2048, 4095), latency=0.005, flush="fail", seed=1
    )
    assert parse_block(str(faults)) == faults


@pytest.mark.parametrize(
    ("parse", "spec", "problem"),
    [
        (parse_net, "drop=130", "vif0: drop: '130' is not a percentage from 0 to 100"),
        (parse_net, "drop=lots", "vif0: drop: 'lots' is not a percentage"),
        (parse_net, "delay=50", "vif0: delay: '50' is not a time like 50ms"),
        (parse_net, "delay=11s", "vif0: delay: '11s' is not a time like 50ms (at most 10 s)"),
        (parse_net, "dir=up", "vif0: dir: 'up' is not one of both, tx, rx"),
        (parse_net, "eio=5", "vif0: eio: not a net fault"),
        (parse_net, "drop", "vif0: 'drop' is not key=value"),
        (parse_net, "drop=1,drop=2", "vif0: drop: given twice"),
        (parse_block, "sectors=10-2", "vif0: sectors: '10-2' is not a range like 2048-4095"),
        (parse_block, "flush=slow", "vif0: flush: 'slow': the only choice is fail"),
        (parse_block, "seed=-1", "vif0: seed: '-1' is not a whole number"),
        (parse_block, "drop=1", "vif0: drop: not a block fault"),
    ],
)
def test_a_bad_spec_is_refused_with_one_line_naming_the_key(
    parse: object, spec: str, problem: str
) -> None:
    with pytest.raises(BadInput) as refused:
        parse(spec, "vif0")  # type: ignore[operator]
    assert len(refused.value.lines) == 1 and refused.value.lines[0].startswith(problem)


def test_every_problem_of_a_spec_gets_its_own_line() -> None:
    with pytest.raises(BadInput) as refused:
        parse_net("drop=200,delay=x,colour=red")
    assert [line.split(":")[1].strip() for line in refused.value.lines] == [
        "drop",
        "delay",
        "colour",
    ]


def test_about_the_asked_share_of_frames_is_dropped_and_only_in_its_direction() -> None:
    dice = NetDice(parse_net("drop=30,dir=tx,seed=11"))
    dropped = sum(dice.frame("tx", 1500).drop for _ in range(10_000))
    assert 2700 < dropped < 3300
    assert not any(dice.frame("rx", 1500).drop for _ in range(1000))


def test_the_same_seed_gives_the_same_faults_to_the_same_frames() -> None:
    spec = parse_net("drop=20,duplicate=10,corrupt=10,delay=10ms,jitter=5ms,seed=42")
    first, second = NetDice(spec), NetDice(spec)
    lengths = [60 + i % 1400 for i in range(2000)]
    assert [first.frame("tx", n) for n in lengths] == [second.frame("tx", n) for n in lengths]
    other = NetDice(parse_net("drop=20,duplicate=10,corrupt=10,seed=43"))
    assert [other.frame("tx", n).drop for n in lengths] != [
        NetDice(spec).frame("tx", n).drop for n in lengths
    ]


def test_a_corrupted_frame_has_one_bit_flipped_inside_it_and_delays_stay_in_bounds() -> None:
    dice = NetDice(parse_net("corrupt=100,delay=50ms,jitter=20ms,seed=1"))
    for length in (1, 60, 1514):
        decision = dice.frame("rx", length)
        assert decision.flip_bit is not None and 0 <= decision.flip_bit < length * 8
        assert 0.03 <= decision.delay <= 0.07
        frame = bytearray(length)
        flip(frame, decision.flip_bit)
        assert sum(bin(b).count("1") for b in frame) == 1


def test_eio_fails_only_requests_that_touch_the_range_and_flushes_fail_on_their_own() -> None:
    dice = BlockDice(parse_block("eio=100,sectors=2048-4095"))
    assert dice.request(False, 2040, 8).fail is False  # 2040-2047: just before
    assert dice.request(False, 2044, 8).fail is True  # 2044-2051: overlaps
    assert dice.request(False, 4095, 1).fail is True
    assert dice.request(False, 4096, 8).fail is False
    assert dice.request(True, 0, 0).fail is False  # flush=fail not asked
    flushes = BlockDice(parse_block("flush=fail"))
    assert flushes.request(True, 0, 0).fail is True
    assert flushes.request(False, 0, 8).fail is False


def test_a_seeded_block_spec_fails_the_same_requests() -> None:
    spec = parse_block("eio=50,latency=1ms,jitter=1ms,seed=5")
    dice = [BlockDice(spec), BlockDice(spec)]
    runs = [[one.request(False, s * 8, 8) for s in range(500)] for one in dice]
    assert runs[0] == runs[1]
    assert 200 < sum(d.fail for d in runs[0]) < 300
    assert all(0.0 <= d.delay <= 0.002 for d in runs[0])
