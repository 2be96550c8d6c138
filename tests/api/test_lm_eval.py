"""The real EleutherAI lm-eval harness (`local-completions`) against a live server: its accuracy on a
local multiple-choice task equals `softserve eval`'s on the same data.

Needs the harness in its own venv: `make lmeval-venv` (then `make lmeval-test`, or
`.venv/bin/python -m pytest -m lmeval tests/api/test_lm_eval.py`). Skipped when that venv is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import httpx
import pytest

from softserve.client import Client
from softserve.evaluation import evaluate, load_eval_data
from tests.support.live_server import REPO_ROOT, TINY_HIDDEN, LiveServer, prompt_bytes, tiny_model_dir, upload

pytestmark = [pytest.mark.lmeval, pytest.mark.process]

LM_EVAL = REPO_ROOT / os.environ.get("LMEVAL_VENV", ".venv-lmeval") / "bin" / "lm_eval"
SENTIMENT = [("I loved every minute of it", 0), ("A boring, tedious mess", 1), ("Wonderful acting and a great story", 0),
             ("I want my money back", 1), ("The best film this year", 0), ("Dull and far too long", 1),
             ("A delight from start to finish", 0), ("Painfully bad dialogue", 1)]


def _write_task(directory, data_path) -> None:
    (directory / "softserve_mc.yaml").write_text(textwrap.dedent(f"""\
        task: softserve_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data_path}
        test_split: test
        output_type: multiple_choice
        doc_to_text: prompt
        doc_to_choice: choices
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
        """))


def test_lm_eval_accuracy_equals_softserve_eval(tmp_path, tmp_path_factory, tokenizer):
    if not LM_EVAL.exists():
        pytest.skip("lm-eval venv missing: run `make lmeval-venv`")
    data = tmp_path / "eval.jsonl"
    rows = [{"prompt": f"Review: {text}\nSentiment:", "choices": [" positive", " negative"], "answer": answer}
            for text, answer in SENTIMENT]
    rows += [{"prompt": f"Q: {a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}"], "answer": 0}
             for a, b in ((2, 2), (3, 5), (10, 7), (6, 1))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    _write_task(task_dir, data)
    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)  # holds the tokenizer files lm-eval loads
    with LiveServer(tmp_path / "store", model=model_dir) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert upload(client, "clf", prompt_bytes(11, 6, TINY_HIDDEN)).status_code == 201
            ours = evaluate(Client(server.url, http_client=client), "clf", load_eval_data(data))
        out = tmp_path / "results"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf")}
        cmd = [str(LM_EVAL), "--model", "local-completions", "--tasks", "softserve_mc", "--include_path", str(task_dir),
               "--model_args", f"model=clf,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                               f"tokenizer={model_dir},num_concurrent=1,max_retries=1",
               "--output_path", str(out), "--log_samples"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:] + server.logs()
    (result_file,) = list(out.rglob("results*.json"))
    acc = json.loads(result_file.read_text())["results"]["softserve_mc"]["acc,none"]
    assert acc == pytest.approx(ours.accuracy), (acc, ours.summary(), ours.predictions)
    # Item by item, not just the total: the same items right and wrong.
    (samples_file,) = list(out.rglob("samples_softserve_mc*.jsonl"))
    theirs = {s["doc_id"]: s["acc"] for s in map(json.loads, samples_file.read_text().splitlines())}
    mine = [float(p == r["choices"][r["answer"]]) for p, r in zip(ours.predictions, rows)]
    assert [theirs[i] for i in range(len(rows))] == mine
    assert 0 < sum(mine) < len(rows) or len(set(ours.predictions)) > 1  # the scores decide something
