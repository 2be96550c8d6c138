#!/usr/bin/env bash
# Everything a lent GPU machine (the `device` tool: bare, offline, ~15 minutes in all) should run, as ONE
# prepared command of under 8 minutes (~6 typical: tests 15 s, gpu_engine.py ~100 s, gpu.sh load ~200 s;
# give the tool's run a timeout_s of 480). Prepare here first (both folders are ignored by git):
#
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions \
#       fastapi starlette opentelemetry-api uvicorn python-multipart gguf llguidance   # what its image lacks
#   .venv/bin/python -c "from bench import common as C; C.embedded_tokenizer().save_pretrained('.gpu/tokenizer')"
#
# then run it there with carry [".whl", ".gpu"]: `bash bench/gpu_device_run.sh` (OUT names the folder the
# results go to; bench/out/gpu-device by default). It runs, each step under its own time limit so that a
# hang costs only that step: the `gpu` tests (tests/engine/test_cuda_graphs.py), bench/gpu_engine.py
# (random SmolLM2-shaped and ~1B models: decode paths, CUDA graphs, host syncs, prompt mixes, profile,
# start-up capture), and bench/gpu.sh's load script (GPU_SUITE_ONLY for others) on a random
# SmolLM2-shaped model directory (the embedded GGUF does not fit the 64 MiB the tool carries).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-bench/out/gpu-device}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export SOFTSERVE_TEST_TOKENIZER_DIR="$PWD/.gpu/tokenizer" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c \
  "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; \
  nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== gpu tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -30

echo "== bench/gpu_engine.py"
timeout "${GPU_ENGINE_TIMEOUT:-170}" python3 bench/gpu_engine.py --tokenizer .gpu/tokenizer --json "$OUT/gpu_engine.json" \
    2>&1 | tee "$OUT/gpu_engine.log" | grep -v "^\[" | tail -60

# load alone took ~200 s on the H200 machine (server start 19 s, 5 concurrencies x 3 configurations).
echo "== bench/gpu.sh (${GPU_SUITE_ONLY:-load}) on a random SmolLM2-shaped model"
python3 bench/gpu_engine.py --tokenizer .gpu/tokenizer --save-model /tmp/smollm2-random >/dev/null 2>&1
PY=python3 GPU_SUITE_TIMEOUT="${GPU_SUITE_TIMEOUT:-240}" bash bench/gpu.sh --model /tmp/smollm2-random \
    --only "${GPU_SUITE_ONLY:-load}" > "$OUT/gpu-suite.log" 2>&1
tail -40 "$OUT/gpu-suite.log"
cp bench/RESULTS-gpu.md "$OUT/" 2>/dev/null
tar czf "$OUT/gpu-suite.tgz" bench/out/gpu 2>/dev/null
exit 0
