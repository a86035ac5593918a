"""A short run of the native pumps' fuzzers (channels/native/fuzz/run.sh), in every test run.

The long run (10^6 executions per pump) is on demand: ``channels/native/fuzz/run.sh``. This
one builds each pump's libFuzzer target with AddressSanitizer and UBSan and runs it briefly
from the honest seeds, so a parser change that crashes on common inputs fails CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "channels" / "native" / "fuzz" / "run.sh"
SMOKE_RUNS = 20000


def test_every_pump_survives_a_short_fuzz_run(tmp_path: Path) -> None:
    if shutil.which("clang") is None:
        if os.environ.get("CI"):
            pytest.fail("clang is missing: scripts/setup.sh installs it")
        pytest.skip("clang is missing (scripts/setup.sh installs it)")
    result = subprocess.run(
        ["bash", str(RUN), str(SMOKE_RUNS)],
        env={**os.environ, "FUZZ_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"no failure in {SMOKE_RUNS} runs of each pump" in result.stderr
    assert result.stderr.count(f"stat::number_of_executed_units: {SMOKE_RUNS}") == 6
