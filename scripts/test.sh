#!/usr/bin/env bash
# The tests: set up, lint (ruff), type-check (mypy), then every test under tests/ with pytest.
# Run as root: the integration tests (tests/integration, marked `root`) start real hypervisors,
# namespaces and cgroups; without root they are skipped. Extra arguments go to pytest, e.g.
#   scripts/test.sh tests/unit/test_config.py -k golden
# Exit status: pytest's when it fails, else 1 if ruff or mypy found a problem, else 0.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$repo/scripts/setup.sh") || exit
cd "$repo" || exit

lint=0
echo '$ ruff check . && ruff format --check .'
"$python" -m ruff check . || lint=1
"$python" -m ruff format --check . || lint=1

# What it checks and how strictly: [tool.mypy] in pyproject.toml.
echo '$ python -m mypy'
"$python" -m mypy || lint=1

# No path given: pytest takes testpaths (tests/) and the per-test timeout from pyproject.toml.
echo '$ python -m pytest -ra' "$@"
"$python" -m pytest -ra "$@"
status=$?

[ "$status" -ne 0 ] || status=$lint
[ "$lint" -eq 0 ] || echo "test.sh: ruff or mypy found problems (see above)" >&2
exit "$status"
