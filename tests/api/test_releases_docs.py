"""docs/releases.md's canary rollout runs as written (curl + jq) against a live server on the tiny model:
only the address, the hidden size and the interpreter are replaced."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.support.live_server import REPO_ROOT, TINY_HIDDEN, LiveServer, tiny_model_dir

DOC = REPO_ROOT / "docs" / "releases.md"


def _rollout_script() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## A canary rollout, end to end"):]
    return re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)[0]  # the curl walkthrough (then the CLI's)


@pytest.mark.process
def test_the_canary_rollout_in_the_docs_runs(tmp_path_factory, tokenizer, tmp_path):
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the walkthrough needs curl and jq")
    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    with LiveServer(tmp_path / "store", model=model_dir, log_dir=tmp_path) as server:
        env = {"URL": server.url, "H": str(TINY_HIDDEN), "PY": sys.executable, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _rollout_script()], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{server.logs()}"
    out = proc.stdout
    served = re.findall(r"^x-softserve-served-model: (support@[0-9a-f]{12})", out, re.M | re.I)
    assert len(served) == 5  # step 3: one header per user
    assert re.search(r"^support@[0-9a-f]{12}$", out, re.M)  # step 2: the body's model names the version
    assert '"object":"feedback"' in out.replace(" ", "")
    assert re.search(r'^softserve_version_requests_total\{prompt="support",version="[0-9a-f]{12}"\} ', out, re.M)
    assert re.search(r'^softserve_version_feedback_score_sum\{prompt="support",version="[0-9a-f]{12}"\} 1\.0', out, re.M)
    assert out.strip().endswith("alias_in_use")
    assert len(re.findall(r'^\{"seq":', out, re.M)) == 3  # history: created, split, promoted
