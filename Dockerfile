# syntax=docker/dockerfile:1
# RottenBot inference service: container images (see README "Deploying", deploy/).
#
#   docker build -t rottenbot-inference .                      # default: slim runtime, demo model
#   docker build --target with-model \
#       --build-context model=/path/to/mlflow-or-keras-model \
#       -t rottenbot-inference:prod .                           # your Keras model, converted at build
#   docker build --target keras -t rottenbot-inference:keras .  # + TensorFlow: converts at start
#
# The runtime images hold no compiler and, except `keras`, no TensorFlow: every runtime
# dependency is a binary wheel (requirements/runtime.txt), and models are served by ONNX Runtime
# from a conversion cached beside the model (the bundled demo model ships its own).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the model to bake into `with-model`: replaced with --build-context model=DIR ---------------
FROM scratch AS model

# --- deps: a virtual environment with the locked runtime dependencies ---------------------------
# (its own stage so that `deps-keras` below does not depend on src/: TensorFlow's layer is
# reused while only the service's code changes)
# binutils: `strip` for the slim stage (build stages only; no runtime image gets it). Wheels are
# installed without bytecode: the slim stage compiles only what the service imports.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-compile -r requirements/runtime.txt

# --- builder: + the service ----------------------------------------------------------------------
FROM deps AS builder
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is not None)"

# --- slim: the builder's venv less what the service never imports at run time -----------------
# (installers, test suites, stubs and headers, onnxruntime's tools and C-API library, botocore's
# non-S3 services, OpenVINO but its CPU plugin and ONNX frontend, debug symbols; bytecode only for
# what is imported: scripts/slim_venv.py, docs/containers.md). Its import check runs the bundled
# ONNX model with ONNX Runtime and compiles it with OpenVINO, so a cut too many fails the build.
FROM builder AS slim
COPY scripts/slim_venv.py /tmp/slim_venv.py
RUN python /tmp/slim_venv.py --strip /opt/venv

# --- deps-keras: + TensorFlow, tf2onnx, onnx at the versions the test lock pins ---------------
FROM deps AS deps-keras
COPY requirements/test.txt requirements/test.txt
RUN pip install --no-compile -c requirements/test.txt tensorflow-cpu tf2onnx onnx

# --- builder-keras: + the service -----------------------------------------------------------------
FROM deps-keras AS builder-keras
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps .

# --- converter: the model from the `model` context, with its ONNX conversion beside it ---------
FROM builder-keras AS converter
COPY --from=model / /model
RUN TF_CPP_MIN_LOG_LEVEL=2 rottenbot-inference convert /model

# --- base: what every runtime image shares (user, folders, settings, health check) -------------
FROM ${PYTHON_IMAGE} AS base
# uid/gid 10001: not root, and not a uid that exists on the host by accident.
RUN groupadd --system --gid 10001 rottenbot \
    && useradd --system --uid 10001 --gid rottenbot --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin rottenbot \
    && mkdir -p /var/lib/rottenbot \
    && chown rottenbot:rottenbot /var/lib/rottenbot
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/var/lib/rottenbot \
    LOG_FORMAT=json \
    MODEL_RUNTIME=openvino
# openvino: OpenVINO (bf16 where the CPU has it natively and the model agrees), ONNX Runtime if
# OpenVINO fails, never the Keras fallback (no TensorFlow in the slim images).
# An empty working directory: no stray .env file is read from it.
WORKDIR /app
# Model cache, durable outbox, embedded database and images: keep it on a volume.
VOLUME ["/var/lib/rottenbot"]
EXPOSE 8000
# Healthy = ready (model loaded and warmed, not shutting down). Python's urllib: no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r\ntry:\n    r.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8000'), timeout=2)\nexcept Exception as exc:\n    sys.exit('not ready: %s' % exc)"]
STOPSIGNAL SIGTERM
USER 10001:10001
ENTRYPOINT ["rottenbot-inference"]
CMD ["serve"]

# --- keras-venv: builder-keras's venv with bytecode (the root filesystem is read-only) ----------
FROM builder-keras AS keras-venv
RUN python -m compileall -q -j 0 /opt/venv

# --- keras: converts Keras models (e.g. from MLflow) at start; ~1.3 GB of TensorFlow more ------
FROM base AS keras
COPY --from=keras-venv /opt/venv /opt/venv
ENV MODEL_RUNTIME=auto

# --- with-model: the slim runtime + a model converted at build time (no TensorFlow inside) -----
FROM base AS with-model
COPY --from=slim /opt/venv /opt/venv
COPY --from=converter /model /opt/model
ENV MODEL_PATH=/opt/model \
    USE_LOCAL=true

# --- runtime (the default target): the slim image serving the bundled demo model ---------------
FROM base AS runtime
COPY --from=slim /opt/venv /opt/venv
