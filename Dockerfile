# The sandbox-worker image: the worker, beat and the egress proxy all run from it (see compose.yaml).
#   docker build -t sandbox-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY providers ./providers
COPY tasks ./tasks
RUN pip install . \
    && useradd --system --create-home --uid 10001 sandbox-worker \
    && rm -rf /src

# No .env is read from here; settings come from the environment (docs/configuration.md).
USER sandbox-worker
WORKDIR /home/sandbox-worker
ENTRYPOINT ["sandbox-worker"]
CMD ["worker", "--providers", "docker"]
