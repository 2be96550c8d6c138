"""Docker build step (not shipped in the image): check the torch build, then serve one completion
with the embedded model so that exactly the modules a server imports get their .pyc files.

pip installs with PIP_NO_COMPILE: compiling every module of torch, transformers and sympy adds
~180 MB of .pyc, most of it for code a server never imports. The image runs as a non-root user who
cannot write to /opt/softserve, so a module left uncompiled here is compiled in memory at each start.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import sys
import tempfile
from pathlib import Path

# Imported on paths the completion below does not take: the real HTTP server, the S3 store, the CLI.
ALWAYS_COMPILED = ["softserve", "uvicorn", "boto3", "botocore", "s3transfer", "h11", "click"]


def check_torch(expect: str) -> None:
    import torch

    cuda = torch.version.cuda
    print(f"torch {torch.__version__} (CUDA {cuda or 'none'})")
    if expect == "cpu" and cuda:
        sys.exit(f"a CUDA torch ({torch.__version__}) was installed for a CPU image: PyPI's torch is the CUDA "
                 "build; point TORCH_INDEX_URL at a CPU index or TORCH_FIND_LINKS at a CPU wheel")
    if expect == "cuda" and not cuda:
        sys.exit(f"a CPU torch ({torch.__version__}) was installed for TORCH_EXPECT=cuda: set TORCH_INDEX_URL "
                 "to a CUDA index (e.g. https://download.pytorch.org/whl/cu128)")


def serve_one_completion() -> None:
    from fastapi.testclient import TestClient

    from softserve.app import create_app
    from softserve.config import Settings

    with tempfile.TemporaryDirectory() as store:
        app = create_app(Settings(store=store, device="cpu"), background_load=False)
        with TestClient(app) as client:
            ready = client.get("/ready")
            assert ready.status_code == 200, ready.text
            model = ready.json()["model"]
            r = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 200, r.text
            print(f"warm-up completion from {model}: {r.json()['choices'][0]['text']!r}")


def compile_packages(names: list[str]) -> None:
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        paths = list(spec.submodule_search_locations or [spec.origin])
        for path in paths:
            target = Path(path)
            ok = compileall.compile_dir(target, quiet=1) if target.is_dir() else compileall.compile_file(target, quiet=1)
            if not ok:
                sys.exit(f"compileall failed for {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-torch", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    check_torch(args.expect_torch)
    serve_one_completion()
    compile_packages(ALWAYS_COMPILED)


if __name__ == "__main__":
    main()
