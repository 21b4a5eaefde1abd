#!/usr/bin/env bash
# The test command: set up, start the local services, run the whole suite, stop the services
# (even when a test fails). Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash infra/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

started=0
cleanup() {
  if [ "$started" = 1 ]; then memstream infra down || true; fi
}
trap cleanup EXIT

ruff check .
ruff format --check .
lint-imports
memstream infra up
started=1
pytest -ra "$@"
