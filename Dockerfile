# Image for memstream processes in production (see infra/compose.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY streams streams
COPY processors processors
COPY sinks sinks
COPY infra infra
RUN pip install --no-cache-dir -c infra/constraints.txt ".[ml]"
ENTRYPOINT []
CMD ["memstream", "--help"]
