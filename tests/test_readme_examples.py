"""README examples run as written against a live server on the real embedded model (SmolLM2, ~20 s
to load): the Quickstart's bash block(s) with `curl` lines, then every Python block that talks to
http://127.0.0.1:8000 (the `openai` snippet, the `softserve.client` snippet), with only the address and
the interpreter path replaced."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.support.live_server import REPO_ROOT, LiveServer

README = REPO_ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Every `curl` in the block goes through this function: it keeps each call's body and exit status.
CURL_WRAPPER = r'''
__n=0
curl() {
  __n=$((__n + 1))
  command curl --max-time 120 "$@" > "$__OUT/curl-$__n.body" && __rc=0 || __rc=$?
  echo "$__rc" > "$__OUT/curl-$__n.rc"
  printf '%s\n' "$*" > "$__OUT/curl-$__n.args"
}
set -e
'''


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start: nxt if nxt != -1 else len(text)]


def _blocks(text: str, lang: str) -> list[str]:
    return [body for fence_lang, body in FENCE.findall(text) if fence_lang == lang]


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_has_the_examples():
    text = _readme()
    quick = _section(text, "## Quickstart")
    assert [b for b in _blocks(quick, "bash") if "curl" in b]
    py = [b for b in _blocks(text, "python") if README_URL in b]
    assert any("from openai import OpenAI" in b for b in py) and any("softserve.client" in b for b in py)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    srv = LiveServer(root / "store", log_dir=root).start()  # no --model: the embedded SmolLM2
    try:
        yield srv
    finally:
        srv.stop()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.process
def test_readme_examples_run(server, tmp_path):
    text = _readme()
    # 1) Quickstart bash block(s) with curl (they upload the `demo` prompt the Python snippets use).
    scripts = [b for b in _blocks(_section(text, "## Quickstart"), "bash") if "curl" in b]
    out_dir = tmp_path / "curl"
    out_dir.mkdir()
    expected_calls = 0
    for script in scripts:
        expected_calls += len(re.findall(r"^\s*curl\s", script, re.M))
        script = script.replace(README_URL, server.url).replace(".venv/bin/python", shlex.quote(sys.executable))
        proc = subprocess.run(["bash", "-c", CURL_WRAPPER + script], cwd=tmp_path, env={**_env(), "__OUT": str(out_dir)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"bash block failed ({proc.returncode}):\n{script}\n{proc.stderr}\n{server.logs()}"
    assert expected_calls > 0
    assert len(list(out_dir.glob("curl-*.rc"))) == expected_calls
    for i in range(1, expected_calls + 1):
        args = (out_dir / f"curl-{i}.args").read_text().strip()
        rc = int((out_dir / f"curl-{i}.rc").read_text())
        body = (out_dir / f"curl-{i}.body").read_text()
        assert rc == 0, f"curl {args} exited {rc}"
        data = json.loads(body)
        assert isinstance(data, dict) and "error" not in data, f"curl {args} -> {body[:500]}"

    # 2) Python snippets against the same server.
    snippets = [b for b in _blocks(text, "python") if README_URL in b]
    assert snippets
    for code in snippets:
        code = code.replace(f"{README_URL}/v1", server.base_url).replace(README_URL, server.url)
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"snippet failed:\n{code}\n{proc.stderr[-3000:]}\n{server.logs()}"
        assert proc.stdout.strip(), f"snippet printed nothing:\n{code}"
