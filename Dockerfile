# syntax=docker/dockerfile:1
#
# oaimux container image. It lives at the repository root because Railway,
# Koyeb's Docker builder and `docker build .` all look for ./Dockerfile there.
# Steps and platform notes: deploy/README.md.
#
#   docker build -t oaimux .
#   docker run --rm -p 8080:8080 --stop-timeout 40 \
#       -e OPENAI_API_KEY -e OAIMUX_API_KEY oaimux
#
# Two stages: the first builds oaimux as a wheel and installs it with its
# extras into a virtual environment; the second copies only that environment
# onto a clean slim image. No compiler is needed in either stage (every
# dependency ships binary wheels) and none ends up in the final image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/oaimux \
 && wheel="$(ls /wheels/oaimux-*.whl)" \
 && /opt/oaimux/bin/pip install "oaimux[fast,redis] @ file://${wheel}" \
 && /opt/oaimux/bin/oaimux serve --help > /dev/null

# --- runtime -----------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# The routes.yaml baked into the image. Mount your own over
# /etc/oaimux/routes.yaml, or build with --build-arg ROUTES=path/to/yours.
ARG ROUTES=deploy/routes.yaml

ENV PATH=/opt/oaimux/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OAIMUX_CONFIG=/etc/oaimux/routes.yaml \
    PORT=8080

RUN groupadd --system --gid 10001 oaimux \
 && useradd --system --uid 10001 --gid oaimux --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin oaimux

COPY --from=build /opt/oaimux /opt/oaimux
COPY ${ROUTES} /etc/oaimux/routes.yaml

USER 10001:10001
WORKDIR /etc/oaimux

# oaimux listens on $PORT (8080 unless the platform sets it).
EXPOSE 8080

# Slim images have no curl: ask /healthz with Python, bypassing any HTTP proxy
# variables, on the port oaimux actually uses.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % (os.environ.get('PORT') or '8080'), timeout=4)"]

# SIGTERM (docker stop) drains open streams for server.shutdown_grace_seconds
# (30 s by default) and exits within that plus one second: give docker stop at
# least that, e.g. --stop-timeout 40.
STOPSIGNAL SIGTERM

# ENTRYPOINT and no CMD: extra `docker run` arguments are appended
# (e.g. `--workers 2`), and a platform "start command" that replaces the
# entrypoint with the same words behaves identically.
ENTRYPOINT ["oaimux", "serve", "--host", "0.0.0.0"]
