"""`softserve run-batch`: the same lines answered offline, in process, in the Batch API's format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.batch.conftest import completion_line, jsonl
from tests.support.live_server import REPO_ROOT, tiny_model_dir


def _lines(model: str) -> list:
    lines = [completion_line(f"r-{i}", f"Review {i}: it was fine", max_tokens=3, model=model) for i in range(10)]
    lines.insert(4, "{broken")
    lines.append(completion_line("nope", "Hi", model="no-such-prompt"))
    return lines


def test_run_batch_in_process_matches_the_batch_api(tiny_model, tokenizer, tmp_path, api):
    from softserve.config import Settings
    from softserve.run_batch import run_batch
    from softserve.service.runtime import LoadedModel
    from tests.batch.conftest import read_lines, upload, wait_batch

    lines = _lines("tiny-llama")
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    result = run_batch(Settings(store=str(tmp_path / "offline-store"), max_model_len=256), tmp_path / "in.jsonl",
                       tmp_path / "out.jsonl", show_progress=False, loaded=LoadedModel(tiny_model, tokenizer, "tiny-llama"))
    assert (result.total, result.completed, result.failed) == (12, 10, 2)
    offline = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # Errors sit at their place in input order (no --error-file), each with its line number.
    assert [o["custom_id"] for o in offline] == [f"r-{i}" for i in range(4)] + [None] + [f"r-{i}" for i in range(4, 10)] + ["nope"]
    assert [o["error"]["line"] for o in offline if o["error"]] == [5, 12]
    # The same file through the live Batch API gives the same answers.
    h = api.h["a"]
    batch = api.post("/v1/batches", headers=h, json={"input_file_id": upload(api, h, jsonl(lines)),
                                                     "endpoint": "/v1/completions"}).json()
    batch = wait_batch(api, h, batch["id"])
    online = read_lines(api, h, batch["output_file_id"])
    texts = [o["response"]["body"]["choices"][0]["text"] for o in offline if o["error"] is None]
    assert texts == [o["response"]["body"]["choices"][0]["text"] for o in online]
    line_numbers = [o["id"].rsplit("_", 1)[1] for o in offline if o["error"] is None]
    assert line_numbers == [o["id"].rsplit("_", 1)[1] for o in online]  # ids end with the input line number


@pytest.mark.process
def test_run_batch_command(tmp_path, tmp_path_factory, tokenizer):
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    (tmp_path / "in.jsonl").write_bytes(jsonl(_lines("tiny")))
    proc = subprocess.run([sys.executable, "-m", "softserve", "run-batch", "-i", str(tmp_path / "in.jsonl"),
                           "-o", str(tmp_path / "out.jsonl"), "--error-file", str(tmp_path / "err.jsonl"),
                           "--model", str(model), "--served-model-name", "tiny", "--store", str(tmp_path / "store"),
                           "--max-model-len", "256", "--torch-threads", "1"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr  # some lines failed
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["completed"], summary["failed"]) == (12, 10, 2)
    assert "run-batch" in proc.stderr and "12/12" in proc.stderr  # the progress bar
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [f"r-{i}" for i in range(10)]
    assert [json.loads(line)["error"]["line"] for line in (tmp_path / "err.jsonl").read_text().splitlines()] == [5, 12]


def test_run_batch_takes_its_offline_defaults_only_for_what_was_not_given(monkeypatch):
    from softserve.config import Settings
    from softserve.run_batch import OFFLINE_DEFAULTS, offline_settings

    monkeypatch.delenv("SOFTSERVE_MAX_BATCH_SIZE", raising=False)
    monkeypatch.delenv("SOFTSERVE_MAX_BACKGROUND_STEP_TOKENS", raising=False)
    assert offline_settings(Settings()).max_batch_size == OFFLINE_DEFAULTS["max_batch_size"] == 512
    assert offline_settings(Settings(max_batch_size=8)).max_batch_size == 8  # a flag wins
    monkeypatch.setenv("SOFTSERVE_MAX_BATCH_SIZE", "16")
    assert offline_settings(Settings()).max_batch_size == 16  # and so does the environment
    # Batch-only steps are bigger offline (no interactive request waits behind them); a flag still wins.
    assert offline_settings(Settings()).max_background_step_tokens == OFFLINE_DEFAULTS["max_background_step_tokens"] == 4096
    assert offline_settings(Settings(max_background_step_tokens=300)).max_background_step_tokens == 300


def test_run_batch_help_shows_its_offline_defaults_and_serve_its_own():
    import argparse

    from softserve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flat = {name: " ".join(p.format_help().split()) for name, p in sub.choices.items()}
    assert "(env SOFTSERVE_MAX_BATCH_SIZE, default 512)" in flat["run-batch"]
    assert "(env SOFTSERVE_MAX_BACKGROUND_STEP_TOKENS, default 4096)" in flat["run-batch"]
    assert "(env SOFTSERVE_MAX_BATCH_SIZE, default 32)" in flat["serve"]
    assert "(env SOFTSERVE_MAX_BACKGROUND_STEP_TOKENS, default 256)" in flat["serve"]
