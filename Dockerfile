# Every image of compose.yaml, built from the local Debian base (scripts/build-image.sh makes it; nothing is
# pulled). Two targets:
#   worker  the worker, beat, Flower and the egress proxy all run from it (Python deps from PyPI)
#   redis   Debian's redis-server
#   docker build --target worker -t sandbox-worker:latest .
#
# Layers are ordered for caching: the OS packages, then the Python dependencies (the list read from
# pyproject.toml), then the sources. Editing the code rebuilds only the last layers (seconds).
# Behind a TLS-intercepting proxy, put its CA certificate(s) in deploy/docker/ca/*.crt (git ignores them).
ARG BASE_IMAGE=sandbox-worker/base:bookworm

FROM ${BASE_IMAGE} AS os
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*

# The runtime dependencies listed in pyproject.toml, one a line.
FROM os AS requirements
COPY pyproject.toml /
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/pyproject.toml", "rb"))["project"]["dependencies"]))' \
    >/requirements.txt

FROM os AS redis
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
USER redis
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["redis-server"]

FROM os AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/sandbox-worker/venv/bin:$PATH
COPY deploy/docker/ca/ /usr/local/share/ca-certificates/extra/
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && update-ca-certificates >/dev/null \
    && python3 -m venv /opt/sandbox-worker/venv \
    && useradd --system --create-home --uid 10001 sandbox-worker
# The dependencies alone first (and Flower, the Celery dashboard): the layer is cached as long as the list is
# the same, whatever else changes in pyproject.toml.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -q -r /tmp/requirements.txt "flower==2.0.1" && rm /tmp/requirements.txt
WORKDIR /opt/sandbox-worker/src
COPY pyproject.toml ./
COPY README.md ./
COPY worker ./worker
COPY providers ./providers
COPY tasks ./tasks
RUN pip install -q --no-deps . && rm -rf build *.egg-info
# The example web app (`uvicorn examples.webapp.app:app`, run from this directory) when the checkout has it;
# the pattern matches nothing otherwise, and pyproject.toml keeps the instruction valid.
COPY pyproject.toml examples/webap[p] ./examples/webapp/

# No .env is read from here; settings come from the environment (docs/configuration.md).
USER sandbox-worker
ENTRYPOINT ["sandbox-worker"]
CMD ["worker", "--providers", "docker"]
