#!/usr/bin/env bash
# The benchmark suite on a CUDA machine, in under 8 minutes (bf16, shorter load windows, one round).
#
#   bench/gpu.sh                       # embedded SmolLM2-135M-Instruct
#   bench/gpu.sh --model /path/to/hf   # a bigger model (an HF directory or a .gguf file)
#   bench/gpu.sh --quick               # seconds: checks that everything runs on the GPU
#
# Results: bench/RESULTS-gpu.md and bench/throughput-gpu.png (JSON and logs in bench/out/gpu/).
# Any other run_all.py flag passes through (e.g. --only load,baselines, --dtype float16).
# GPU_SUITE_TIMEOUT (seconds, default 470) bounds the whole run; PY names the Python (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: torch does not see a CUDA device (install a CUDA build of torch)" >&2
    exit 2
fi
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q matplotlib || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
TAG=gpu
for arg in "$@"; do [ "$arg" = "--quick" ] && TAG=gpu-quick; done
# `timeout` keeps the whole run inside the 8-minute budget even if a step hangs (it signals the whole
# process group: run_all, the script and its server). RESULTS is rewritten after every script.
exec timeout --signal=TERM "${GPU_SUITE_TIMEOUT:-470}" "$PY" bench/run_all.py --device cuda --dtype auto --profile gpu \
    --out "bench/out/$TAG" --results "bench/RESULTS-$TAG.md" --png "bench/throughput-$TAG.png" "$@"
