"""The offline Docker recipe end to end (marker `docker`, not in `make test`: it takes 10-15 min on
2 cores). Runs deploy/build-offline.sh as the docs say (debootstrap base, CA certificates, docker
import, docker build), starts the image with `--network none`, and gets a completion through
`docker exec` with the image's own python (the image has no curl).

    .venv/bin/python -m pytest -m docker tests/deploy/test_docker_image.py

Needs root, a running dockerd, debootstrap, the Debian and PyPI mirrors this host's apt and pip
use, and a CPU torch wheel in one of pip's find-links directories; skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.process]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "build-offline.sh"
TAG = "softserve:docker-test"
BASE_TAG = "softserve-base:docker-test"
IMAGE_SIZE_LIMIT = 1_000_000_000  # the goal for the CPU image (it was 1.54 GB)

# Run inside the container by the image's python: wait for /ready, then one completion.
CLIENT = """
import json, sys, time, urllib.request, urllib.error
base = "http://127.0.0.1:8000"
deadline = time.monotonic() + 300
while True:
    try:
        model = json.load(urllib.request.urlopen(base + "/ready", timeout=5))["model"]
        break
    except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
            sys.exit("not ready after 300 s")
        time.sleep(1)
body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=120).read().decode())
"""


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"docker {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


def _cpu_torch_wheel_dir() -> Path | None:
    """A find-links directory of this host's pip that holds a CPU torch wheel."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for entry in value.strip("'\"").split():
                path = Path(entry.removeprefix("file://"))
                if path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
                    return path
    return None


@pytest.fixture(scope="module")
def built_image():
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("dockerd does not answer (start it: dockerd &)")
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the recipe needs root and debootstrap (apt-get install debootstrap)")
    wheels = _cpu_torch_wheel_dir()
    if wheels is None:
        pytest.skip("no CPU torch wheel in pip's find-links directories")
    r = subprocess.run([str(SCRIPT), "--rebuild-base", "--base-tag", BASE_TAG, "--tag", TAG, "--wheels", str(wheels)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    yield TAG
    # The legacy builder keeps the build stage as an untagged image: remove this run's, then the tags.
    # Deleting ~3 GB of layers took over 2 minutes on a busy disk, hence the long timeouts.
    leftovers = _docker("image", "ls", "-q", "--filter", "dangling=true", "--filter", f"since={BASE_TAG}",
                        check=False).stdout.split()
    for images in ([TAG, *leftovers], [BASE_TAG]):
        try:
            _docker("image", "rm", *images, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            print(f"docker image rm {' '.join(images)} still running after 900 s", file=sys.stderr)


def test_offline_image_serves_a_completion_without_network(built_image):
    name = f"softserve-test-{uuid.uuid4().hex[:8]}"
    _docker("run", "-d", "--network", "none", "--name", name, built_image)
    try:
        r = _docker("exec", name, "python3", "-c", CLIENT, timeout=600, check=False)
        assert r.returncode == 0, r.stdout + r.stderr + _docker("logs", name, check=False).stderr[-4000:]
        completion = json.loads(r.stdout)
        assert completion["object"] == "text_completion"
        assert completion["choices"][0]["text"].strip()
        assert completion["usage"]["completion_tokens"] > 0
        assert _docker("exec", name, "id", "-u").stdout.strip() == "10001"  # not root
        # The HEALTHCHECK (/health, every 15 s) turns the container healthy.
        deadline = time.monotonic() + 60
        while _docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() != "healthy":
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(2)
        # SIGTERM drains and exits 0 (not 137 after docker's 10 s kill timeout).
        _docker("stop", name, timeout=60)
        assert _docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        _docker("rm", "-f", name, check=False)


def test_cpu_image_is_under_1_gb(built_image):
    size = int(_docker("image", "inspect", "-f", "{{.Size}}", built_image).stdout)
    assert size < IMAGE_SIZE_LIMIT, f"{built_image} is {size / 1e9:.2f} GB"
