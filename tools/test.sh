#!/usr/bin/env bash
# The test suite: unit tests (no root needed) and integration tests that build
# real namespaces (root). Every test cluster has its own name and is removed even
# when the test fails; the suite finishes by checking that nothing was left.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@" tests
