"""Run a data-path test once with each implementation of the netif pumps.

``both_pumps`` is an autouse fixture a test module imports: every test in it runs with the
native pumps (channels._netpump) and with the Python reference (``HYPER_PUMPS=python``), since
each data path picks its pump as its thread starts. Where the extension is not built the native
run is skipped, except under CI, which builds it (scripts/setup.sh): there it fails.
"""

from __future__ import annotations

import os

import pytest

from channels import pumps

IMPLEMENTATIONS = ("native", "python")


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS)
def both_pumps(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(pumps.ENV, request.param)
    if request.param == "native" and pumps.native() is None:
        if os.environ.get("CI"):
            pytest.fail(f"the native pumps are not built: {pumps.describe()}")
        pytest.skip(pumps.describe())
    return str(request.param)
