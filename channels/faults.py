"""Fault injection at the channel (issue 16): the spec a user writes, and the decisions a backend
takes from it as each frame or request crosses the ring, the way netem and QEMU's blkdebug do.

A spec is one string of comma-separated ``key=value`` items, as a device spec is (or
semicolon-separated, inside a device spec: ``target=d.img,vdev=xvda,faults=eio=100;flush=fail``):

net (a vif; each fault applies to ``dir``'s frames: ``tx`` from the domain, ``rx`` to it, or
``both``, the default)::

    drop=30          drop 30 % of frames            corrupt=5   flip one bit in 5 % of them
    duplicate=2      send 2 % of them twice         delay=50ms  hold each frame 50 ms
    jitter=10ms      plus or minus up to 10 ms (frames then overtake each other)
    seed=7           the same decisions for the same traffic, run after run

block (a disk)::

    eio=100          fail 100 % of the requests with EIO (BLKIF_RSP_ERROR) ...
    sectors=2048-4095  ... of those that touch these sectors (all of them by default)
    latency=5ms      answer each request 5 ms late      jitter=2ms
    flush=fail       fail every flush (an fsync inside fails)
    seed=1

A percentage is a number from 0 to 100 (a trailing ``%`` allowed); a time is a number with
``us``, ``ms`` or ``s``. ``parse_net`` and ``parse_block`` return a ``NetFaults`` or
``BlockFaults`` (``str()`` gives the spec back in a canonical order), or raise BadInput with one
line per problem, naming the key. The decisions (``NetDice``, ``BlockDice``) draw from their
own ``random.Random``: seeded, the same sequence of frames or requests meets the same faults.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from typing import Any

from channels.errors import BadInput

NET_DIRECTIONS = ("both", "tx", "rx")
_TIME = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s)")
_RANGE = re.compile(r"(\d+)-(\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
MAX_DELAY = 10.0  # seconds: a frame or request held longer is a test's mistake


@dataclass(frozen=True)
class NetFaults:
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay: float = 0.0  # seconds
    jitter: float = 0.0
    dir: str = "both"
    seed: int | None = None

    def applies(self, direction: str) -> bool:
        """Whether frames going ``direction`` ("tx": from the domain, "rx": to it) meet it."""
        return self.dir in ("both", direction)

    def __bool__(self) -> bool:
        return any((self.drop, self.duplicate, self.corrupt, self.delay, self.jitter))

    def __str__(self) -> str:
        return _spec(self, NetFaults())


@dataclass(frozen=True)
class BlockFaults:
    eio: float = 0.0
    sectors: tuple[int, int] | None = None  # first and last sector, inclusive
    latency: float = 0.0  # seconds
    jitter: float = 0.0
    flush: str = ""  # "fail"
    seed: int | None = None

    def __bool__(self) -> bool:
        return any((self.eio, self.latency, self.jitter, self.flush))

    def __str__(self) -> str:
        return _spec(self, BlockFaults())


def parse_net(spec: str, where: str = "faults") -> NetFaults:
    """A vif's faults; BadInput naming ``where`` and the key for each problem."""
    items, problems = _items(spec, where)
    values: dict[str, Any] = {}  # each value checked as it is put here
    for key, value in items.items():
        if key in ("drop", "duplicate", "corrupt"):
            values[key] = _percent(value, where, key, problems)
        elif key in ("delay", "jitter"):
            values[key] = _time(value, where, key, problems)
        elif key == "dir":
            if value not in NET_DIRECTIONS:
                problems.append(
                    f"{_at(where)}dir: {value!r} is not one of {', '.join(NET_DIRECTIONS)}"
                )
            values[key] = value
        elif key == "seed":
            values[key] = _seed(value, where, problems)
        else:
            problems.append(
                f"{_at(where)}{key}: not a net fault (drop, duplicate, corrupt, delay, "
                "jitter, dir, seed)"
            )
    if problems:
        raise BadInput("invalid faults", problems)
    return NetFaults(**values)


def parse_block(spec: str, where: str = "faults") -> BlockFaults:
    """A disk's faults; BadInput naming ``where`` and the key for each problem."""
    items, problems = _items(spec, where)
    values: dict[str, Any] = {}  # each value checked as it is put here
    for key, value in items.items():
        if key == "eio":
            values[key] = _percent(value, where, key, problems)
        elif key in ("latency", "jitter"):
            values[key] = _time(value, where, key, problems)
        elif key == "sectors":
            match = _RANGE.fullmatch(value)
            if match is None or int(match[1]) > int(match[2]):
                problems.append(f"{_at(where)}sectors: {value!r} is not a range like 2048-4095")
            else:
                values[key] = (int(match[1]), int(match[2]))
        elif key == "flush":
            if value != "fail":
                problems.append(f"{_at(where)}flush: {value!r}: the only choice is fail")
            values[key] = value
        elif key == "seed":
            values[key] = _seed(value, where, problems)
        else:
            problems.append(
                f"{_at(where)}{key}: not a block fault (eio, sectors, latency, jitter, flush, seed)"
            )
    if problems:
        raise BadInput("invalid faults", problems)
    return BlockFaults(**values)


@dataclass(frozen=True)
class NetDecision:
    drop: bool = False
    copies: int = 1  # 2 when duplicated
    flip_bit: int | None = None  # the bit of the frame to flip, when corrupted
    delay: float = 0.0


class NetDice:
    """The faults each frame meets, in order; seeded, the same for the same frames."""

    def __init__(self, faults: NetFaults) -> None:
        self.faults = faults
        self._random = random.Random(faults.seed)

    def frame(self, direction: str, length: int) -> NetDecision:
        f = self.faults
        if not f.applies(direction) or length <= 0:
            return NetDecision()
        r = self._random
        # Every draw is taken whatever the earlier ones gave: a frame's fate never shifts the
        # sequence the next frames meet.
        drop, dup, corrupt, bit = r.random(), r.random(), r.random(), r.randrange(length * 8)
        jitter = r.uniform(-f.jitter, f.jitter) if f.jitter else 0.0
        return NetDecision(
            drop=drop * 100 < f.drop,
            copies=2 if dup * 100 < f.duplicate else 1,
            flip_bit=bit if corrupt * 100 < f.corrupt else None,
            delay=max(0.0, f.delay + jitter),
        )


def flip(frame: bytearray, bit: int) -> None:
    frame[bit // 8] ^= 1 << (bit % 8)


@dataclass(frozen=True)
class BlockDecision:
    fail: bool = False
    delay: float = 0.0


class BlockDice:
    """The faults each request meets, in order; seeded, the same for the same requests."""

    def __init__(self, faults: BlockFaults) -> None:
        self.faults = faults
        self._random = random.Random(faults.seed)

    def request(self, flush: bool, sector: int, count: int) -> BlockDecision:
        """A request of ``count`` sectors from ``sector`` (a flush: ``flush``, any range)."""
        f = self.faults
        r = self._random
        eio, jitter = r.random(), (r.uniform(-f.jitter, f.jitter) if f.jitter else 0.0)
        delay = max(0.0, f.latency + jitter)
        if flush and f.flush == "fail":
            return BlockDecision(fail=True, delay=delay)
        touches = f.sectors is None or (
            count > 0 and sector <= f.sectors[1] and sector + count - 1 >= f.sectors[0]
        )
        return BlockDecision(fail=touches and not flush and eio * 100 < f.eio, delay=delay)


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _items(spec: str, where: str) -> tuple[dict[str, str], list[str]]:
    """The spec's items; ``;`` separates them too, so that a spec fits in a device spec."""
    items: dict[str, str] = {}
    problems: list[str] = []
    for item in (part.strip() for part in spec.replace(";", ",").split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not value:
            problems.append(f"{_at(where)}{item!r} is not key=value")
        elif key in items:
            problems.append(f"{_at(where)}{key}: given twice")
        else:
            items[key.strip()] = value.strip()
    return items, problems


def _percent(value: str, where: str, key: str, problems: list[str]) -> float:
    try:
        number = float(value.removesuffix("%"))
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 100.0:
        problems.append(f"{_at(where)}{key}: {value!r} is not a percentage from 0 to 100")
        return 0.0
    return number


def _time(value: str, where: str, key: str, problems: list[str]) -> float:
    match = _TIME.fullmatch(value)
    seconds = float(match[1]) * _UNITS[match[2]] if match else -1.0
    if not 0.0 <= seconds <= MAX_DELAY:
        problems.append(f"{_at(where)}{key}: {value!r} is not a time like 50ms (at most 10 s)")
        return 0.0
    return seconds


def _seed(value: str, where: str, problems: list[str]) -> int:
    if not value.isdecimal():
        problems.append(f"{_at(where)}seed: {value!r} is not a whole number")
        return 0
    return int(value)


def _spec(faults: NetFaults | BlockFaults, default: NetFaults | BlockFaults) -> str:
    """The spec that parses back to ``faults``: its keys that differ from the default."""
    parts = []
    for field in fields(faults):
        value = getattr(faults, field.name)
        if value == getattr(default, field.name):
            continue
        if field.name in ("delay", "jitter", "latency"):
            parts.append(f"{field.name}={value * 1000:g}ms")
        elif field.name == "sectors":
            parts.append(f"sectors={value[0]}-{value[1]}")
        elif isinstance(value, float):
            parts.append(f"{field.name}={value:g}")
        else:
            parts.append(f"{field.name}={value}")
    return ",".join(parts)
