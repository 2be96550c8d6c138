"""`softserve eval`'s scorer against the API (tiny model, in process) vs an independent in-process reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.client import Client
from softserve.config import Settings
from softserve.evaluation import EvalDataError, evaluate, load_eval_data

ITEMS = [
    {"prompt": "Review: I loved it.\nSentiment:", "choices": [" positive", " negative"], "answer": 0},
    {"prompt": "Review: boring and long.\nSentiment:", "choices": [" positive", " negative"], "answer": " negative"},
    {"prompt": "Q: 2 + 2 =", "choices": [" 4", " 5", " twenty-two"], "answer": 0},
    {"prompt": "The colour of the sky is ", "choices": ["blue", "green", "a deep shade of red"], "answer": 0},
    {"prompt": "Capital of France:", "choices": [" Paris", " Lyon"], "answer": 1},
    {"prompt": "Animal that barks:", "choices": [" dog", " cat", " fish", " bird"], "answer": 0},
]


@pytest.fixture(scope="module")
def soft(tiny_model):
    return torch.randn(5, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def client(tiny_model, tokenizer, soft, tmp_path_factory):
    settings = Settings(store=str(tmp_path_factory.mktemp("store")), max_model_len=256)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        assert c.put("/v1/prompts/clf", files={"adapter_model": ("a.safetensors", save({"prompt_embeddings": soft}))}).status_code == 201
        c.softserve = Client(str(c.base_url), http_client=c)  # what `evaluate` takes, over the same in-process app
        yield c


@torch.inference_mode()
def _reference_choice(model, tokenizer, soft, item) -> int:
    """lm-eval's rule: continuation = tokens of (context + choice) after the context's tokens."""
    context = item["prompt"].rstrip()
    moved = item["prompt"][len(context):]
    context_ids = tokenizer(context).input_ids
    scores = []
    for choice in item["choices"]:
        whole = tokenizer(context + moved + choice).input_ids
        assert whole[:len(context_ids)] == context_ids
        x = model.get_input_embeddings()(torch.tensor([whole]))
        if soft is not None:
            x = torch.cat([soft.unsqueeze(0), x], dim=1)
        logprobs = torch.log_softmax(model(inputs_embeds=x).logits[0, -len(whole):].float(), dim=-1)
        scores.append(sum(float(logprobs[j - 1, whole[j]]) for j in range(len(context_ids), len(whole))))
    return max(range(len(scores)), key=scores.__getitem__)


@pytest.mark.parametrize("model", ["tiny", "clf"])
def test_choice_accuracy_equals_reference(client, tiny_model, tokenizer, soft, tmp_path, model):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in ITEMS) + "\n")
    items = load_eval_data(path)
    result = evaluate(client.softserve, model, items)
    expected = [_reference_choice(tiny_model, tokenizer, soft if model == "clf" else None, i) for i in ITEMS]
    assert result.predictions == [i["choices"][e] for i, e in zip(ITEMS, expected)]
    answers = [item.answer for item in items]
    assert result.correct == sum(e == a for e, a in zip(expected, answers)) and result.total == len(ITEMS)
    assert result.mode == "choices"


def test_exact_match_lines(client, tmp_path):
    greedy = client.post("/v1/completions", json={"model": "clf", "prompt": "Say:", "max_tokens": 5, "temperature": 0})
    text = greedy.json()["choices"][0]["text"]
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"prompt": "Say:", "completion": f"  {text.strip()} "}) + "\n"
                    + json.dumps({"prompt": "Say:", "completion": "certainly not this"}) + "\n"
                    + json.dumps(ITEMS[0]) + "\n")
    result = evaluate(client.softserve, "clf", load_eval_data(path), max_tokens=5)
    assert result.summary() == {"accuracy": pytest.approx(result.correct / 3), "correct": result.correct, "total": 3,
                                "mode": "mixed"}
    assert result.predictions[0] == text and result.correct >= 1


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: invalid JSON"),
    ('{"prompt": "x", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"prompt": "x", "choices": ["a", "b"], "answer": 5}', "answer"),
    ('{"prompt": "x"}', "needs 'choices'"),
])
def test_bad_eval_data_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    with pytest.raises(EvalDataError, match=message):
        load_eval_data(path)


@pytest.mark.process
def test_eval_cli_help_and_bad_file(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "softserve", "eval", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--data" in help_text.stdout and "log-likelihood" in help_text.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "softserve", "eval", "--model", "m", "--data", str(bad)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "line 1" in run.stderr
