# syntax=docker/dockerfile:1
# kimi-gateway container image.
#
#   docker build -t kimi-gateway .
#   docker build --build-arg EXTRAS='[litellm]' -t kimi-gateway .   # with kind: litellm upstreams
#   docker run --rm -p 4000:4000 kimi-gateway                      # demo: simulated upstreams, no key needed
#   docker run --rm -p 4000:4000 -e MOONSHOT_API_KEY -e OPENROUTER_API_KEY -v kimi-data:/data kimi-gateway \
#       serve --config config/gateway.yaml --host 0.0.0.0 --port 4000
#
# Two stages: the builder installs the gateway and its dependencies into a virtualenv; the runtime
# stage copies only that virtualenv plus config/ and policies/, and runs as an unprivileged user.

############################ builder ############################
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# README.md* : pyproject.toml names README.md as the readme; the glob keeps this COPY valid
# whether or not the file exists yet (pyproject.toml always matches).
COPY pyproject.toml README.md* ./
COPY gateway ./gateway
COPY simulator ./simulator

# Every dependency ships manylinux wheels for CPython 3.11 (amd64 and arm64), so no compiler is
# needed. pip byte-compiles the installed files here, so the runtime never writes .pyc files.
# The checks run from / so they import the installed package, not the source tree in /src.
# optional extras of the package, e.g. --build-arg EXTRAS='[litellm]'
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" \
    && cd / && python -c "import gateway.app, simulator" \
    && kimi-gateway --help >/dev/null

############################ runtime ############################
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Unprivileged user (uid/gid 10001) and its data directory (embedded SQLite ledger and other state).
# /data is created and chowned before VOLUME so a fresh named volume inherits the ownership. The
# configs name their SQLite ledger ../data/*.db relative to /app/config: /app/data links to /data, so
# the ledger lands in the volume (/app itself stays root-owned and read-only for the gateway user).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /app \
    && chown 10001:10001 /data \
    && ln -s /data /app/data

WORKDIR /app

# The virtualenv points at /usr/local/bin/python3.11, which is the same path in both stages.
COPY --from=builder /opt/venv /opt/venv
# Read-only for the gateway user (owned by root): configuration and tenant policies.
COPY config ./config
COPY policies ./policies

VOLUME ["/data"]
USER 10001:10001
EXPOSE 4000

# Liveness only (GET /healthz). Python's stdlib, since the slim image has no curl or wget;
# urlopen raises on a non-2xx answer or a refused connection, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:4000/healthz', timeout=3).status == 200 else 1)"]

ENTRYPOINT ["kimi-gateway"]
CMD ["serve", "--config", "config/demo.yaml", "--host", "0.0.0.0", "--port", "4000"]
