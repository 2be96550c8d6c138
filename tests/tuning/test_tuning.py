"""Prompt tuning: data parsing and masking, init, frozen weights, determinism, learning, PEFT
compatibility of the exported adapter (logits equal to our engine's), and the job API lifecycle.

Everything runs on the tiny random Llama (SmolLM2's tokenizer); one slow test tunes SmolLM2 itself.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from fastapi.testclient import TestClient

from tests.support.engine_utils import make_engine
from softserve.engine.request import Request, SamplingParams, SoftPrompt, SoftPromptRef
from softserve.tuning.data import DatasetError, parse_jsonl, parse_records, tokenize_examples
from softserve.tuning.export import adapter_files, model_info, save_adapter
from softserve.tuning.init import init_prompt, text_init_ids
from softserve.tuning.trainer import PromptTuner, TuningConfig, greedy_generate
from tests.support.tuning import toy_data, toy_records, wait_for_job

def param_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- data -----------------------------------------------------------------------------------------
def test_parse_errors_name_the_line():
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = [
        (f"{good}\n\n{{not json\n", 3, "invalid JSON"),
        (f"{good}\n{json.dumps({'prompt': 'a'})}\n", 2, "missing field"),
        (f"{json.dumps({'prompt': 1, 'completion': 'b'})}\n", 1, "must be strings"),
        (f"{good}\n{json.dumps({'prompt': 'a', 'completion': '  '})}\n", 2, "empty"),
        (f"{good}\n{good}\n[1, 2]\n", 3, "JSON object"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), 1, "role"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), 1, "no non-empty assistant turn"),
        (json.dumps({"messages": [], "prompt": "x"}), 1, "either"),
    ]
    for text, line, fragment in cases:
        with pytest.raises(DatasetError) as info:
            parse_jsonl(text, source="train.jsonl")
        assert info.value.line == line, text
        assert f"train.jsonl, line {line}:" in str(info.value) and fragment in str(info.value), str(info.value)
    with pytest.raises(DatasetError, match="empty"):
        parse_jsonl("\n\n")
    with pytest.raises(DatasetError, match="training_data, line 2"):
        parse_records([{"prompt": "a", "completion": "b"}, {"completion": "b"}], source="training_data")


def test_completion_labels_mask_the_prompt(tokenizer):
    [ex] = tokenize_examples(tokenizer, parse_records([{"prompt": "Review: great food\nSentiment:", "completion": " positive"}]))
    prompt_ids = tokenizer("Review: great food\nSentiment:").input_ids
    target_ids = tokenizer(" positive", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ex.input_ids == prompt_ids + target_ids
    assert ex.labels == [-100] * len(prompt_ids) + target_ids
    assert ex.prompt_ids == prompt_ids and ex.target == " positive"


def test_too_long_example_names_the_line(tokenizer):
    records = [{"prompt": "short", "completion": " x"}, {"prompt": "word " * 200, "completion": " x"}]
    with pytest.raises(DatasetError, match="line 2: example is .* tokens; the limit is 50"):
        tokenize_examples(tokenizer, parse_records(records, source="data"), max_length=50)


def test_chat_labels_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Answer like a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Ahoy matey"},
        {"role": "user", "content": "Where is my friend?"},
        {"role": "assistant", "content": "Yer matey be ashore"},
    ]
    [ex] = tokenize_examples(tokenizer, parse_records([{"messages": messages}]))
    assert len(ex.input_ids) == len(ex.labels)
    # The labelled spans, decoded, are exactly the assistant turns with their end-of-turn token.
    spans, cur = [], []
    for tid, label in zip(ex.input_ids, ex.labels):
        if label != -100:
            assert label == tid
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tokenizer.decode(s) for s in spans] == ["Ahoy matey<|im_end|>", "Yer matey be ashore<|im_end|>"]
    # The context before the last turn is what /v1/chat/completions feeds for the same conversation.
    served = tokenizer(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    assert ex.prompt_ids == served
    assert ex.target == "Yer matey be ashore"
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)


# ---- init -----------------------------------------------------------------------------------------
def test_init_methods(tiny_model, tokenizer):
    embed = tiny_model.get_input_embeddings().weight
    ids = tokenizer("Classify it")["input_ids"]
    t = init_prompt(tiny_model, tokenizer, 5, "text", "Classify it")
    expected_ids = (ids * 5)[:5]
    assert text_init_ids(tokenizer, "Classify it", 5) == expected_ids
    assert torch.equal(t, embed[expected_ids].float()) and t.dtype == torch.float32
    long_ids = tokenizer("one two three four five six seven")["input_ids"]
    assert torch.equal(init_prompt(tiny_model, tokenizer, 3, "text", "one two three four five six seven"), embed[long_ids[:3]])
    v = init_prompt(tiny_model, tokenizer, 6, "vocab", seed=1)
    assert all(any(torch.equal(row, e) for e in embed) for row in v[:2])
    assert torch.equal(v, init_prompt(tiny_model, tokenizer, 6, "vocab", seed=1))
    assert not torch.equal(v, init_prompt(tiny_model, tokenizer, 6, "vocab", seed=2))
    r = init_prompt(tiny_model, tokenizer, 64, "random", seed=0)
    assert r.shape == (64, 64) and 0.9 < float(r.std()) < 1.1  # PEFT RANDOM: nn.Embedding's N(0, 1)
    with pytest.raises(ValueError):
        init_prompt(tiny_model, tokenizer, 4, "text", "")


# ---- trainer --------------------------------------------------------------------------------------
def _tune(model, tokenizer, data, evals=None, **cfg):
    cfg.setdefault("num_virtual_tokens", 4)
    cfg.setdefault("init", "vocab")
    cfg.setdefault("steps", 3)
    cfg.setdefault("batch_size", 4)
    cfg.setdefault("learning_rate", 0.1)
    return PromptTuner(model, tokenizer, data, evals, TuningConfig(**cfg)).run()


def test_weights_unchanged_and_no_grads(tiny_model, tokenizer):
    before = param_digest(tiny_model)
    init = init_prompt(tiny_model, tokenizer, 4, "vocab", seed=0)
    result = _tune(tiny_model, tokenizer, toy_data(tokenizer, 8), toy_data(tokenizer, 4), steps=3, micro_batch_size=2)
    assert param_digest(tiny_model) == before
    for name, p in tiny_model.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    assert not tiny_model.training
    assert result.embeddings.dtype == torch.float32 and result.embeddings.shape == (4, 64)
    assert not torch.equal(result.embeddings, init)  # P did learn


def test_deterministic_with_seed(tiny_model, tokenizer):
    data = toy_data(tokenizer, 10)
    a = _tune(tiny_model, tokenizer, data, seed=7, steps=3)
    b = _tune(tiny_model, tokenizer, data, seed=7, steps=3)
    c = _tune(tiny_model, tokenizer, data, seed=8, steps=3)
    assert torch.equal(a.embeddings, b.embeddings)
    assert [h.loss for h in a.history] == [h.loss for h in b.history]
    assert not torch.equal(a.embeddings, c.embeddings)


def test_micro_batches_equal_full_batch(tiny_model, tokenizer):
    data = toy_data(tokenizer, 8)
    full = _tune(tiny_model, tokenizer, data, steps=2, batch_size=4, max_grad_norm=None)
    micro = _tune(tiny_model, tokenizer, data, steps=2, batch_size=4, micro_batch_size=1, max_grad_norm=None)
    torch.testing.assert_close(micro.embeddings, full.embeddings, atol=1e-5, rtol=0)


def test_loss_decreases_and_learns_the_task(tiny_model, tokenizer):
    """A fixed answer on a random model: the prompt alone must make greedy decoding produce it.
    (No EOS target: the tiny model's tied, zero-initialised padding row makes EOS unreachable.)"""
    data = tokenize_examples(tokenizer, parse_records(toy_records(8, answer=lambda i: " ok")), append_eos=False)
    evals = tokenize_examples(tokenizer, parse_records([{"prompt": "Word: zebra\nLabel:", "completion": " ok"}]), append_eos=False)
    result = _tune(tiny_model, tokenizer, data, evals, steps=15, learning_rate=0.3, eval_at_start=True,
                   lr_schedule="constant", eval_max_new_tokens=1)
    losses = [h.loss for h in result.history if h.loss is not None]
    assert losses[-1] < 0.2 * losses[0], losses
    assert result.history[0].eval_accuracy == 0.0 and result.eval_accuracy == 1.0
    assert result.eval_loss < result.history[0].eval_loss


def test_trainer_takes_the_step_lock_and_yields(tiny_model, tokenizer):
    class CountingLock:
        def __init__(self):
            self.entered = 0
            self.held = False

        def __enter__(self):
            assert not self.held
            self.held = True
            self.entered += 1

        def __exit__(self, *exc):
            self.held = False

    lock, yields = CountingLock(), []
    tuner = PromptTuner(tiny_model, tokenizer, toy_data(tokenizer, 4), None,
                        TuningConfig(num_virtual_tokens=2, init="vocab", steps=2, batch_size=4, micro_batch_size=2),
                        step_lock=lock, yield_fn=lambda busy: yields.append(lock.held))
    tuner.run()
    assert lock.entered == 2 * (2 + 1)  # per step: two micro-batches + the optimizer update
    assert yields == [False] * lock.entered  # every yield happens with the lock released


# ---- PEFT compatibility ---------------------------------------------------------------------------
def test_exported_adapter_loads_in_peft_and_matches_engine(tiny_model, tokenizer, tmp_path):
    from peft import PeftModel

    data = toy_data(tokenizer, 8)
    cfg = TuningConfig(num_virtual_tokens=5, init="text", init_text="Label the word", steps=3, batch_size=4, learning_rate=0.1)
    tuner = PromptTuner(tiny_model, tokenizer, data, None, cfg)
    result = tuner.run()
    info = model_info(tiny_model, "tiny-llama")
    directory = save_adapter(adapter_files(result.embeddings, cfg, info, tokenizer_name_or_path="tiny-tok"), tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 5 and config["token_dim"] == 64
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Label the word"

    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), directory).eval()
    loaded = peft_model.get_prompt_embedding_to_save("default")
    assert torch.equal(loaded, result.embeddings)

    # 1. The training objective is PEFT's: same loss as PeftModel.forward(labels=...).
    ex = data[:3]
    longest = max(len(e.input_ids) for e in ex)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (longest - len(e.input_ids)) for e in ex])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (longest - len(e.input_ids)) for e in ex])
    labels = torch.tensor([e.labels + [-100] * (longest - len(e.input_ids)) for e in ex])
    with torch.no_grad():
        peft_loss = float(peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        ours_sum, n = tuner._loss_sum(result.embeddings, ex)
    assert abs(float(ours_sum) / n - peft_loss) < 1e-4

    # 2. PEFT's logits at every generated position equal our serving engine's (fp32).
    engine = make_engine(tiny_model, tokenizer)
    soft = SoftPrompt(SoftPromptRef("tuned", "v1", "sha-tuned", 5), result.embeddings)
    texts = ["Word: apple\nLabel:", "Word: zebra crossing\nLabel:"]
    requests = [Request(request_id=f"p{i}", prompt_ids=tokenizer(t).input_ids, soft_prompt=soft,
                        sampling=SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, ignore_eos=True))
                for i, t in enumerate(texts)]
    outs = engine.generate_sync(requests)
    for request in requests:
        steps = [lp for o in outs[request.request_id] for lp in o.logprobs]
        assert len(steps) == 4
        ids = list(request.prompt_ids)
        for lp in steps:
            with torch.no_grad():
                logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            ref = torch.log_softmax(logits[0, -1].float(), -1)
            top = torch.topk(ref, 5)
            assert [t for t, _, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, _, v in lp.top]), top.values, atol=1e-4, rtol=0)
            assert lp.token_id == int(ref.argmax())
            ids.append(lp.token_id)
    # 3. Our eval decoder (used for exact-match accuracy) agrees with the engine too.
    mine = greedy_generate(tiny_model, result.embeddings, [r.prompt_ids for r in requests], 4, set(), tokenizer.pad_token_id)
    for request, got in zip(requests, mine):
        assert got == [t for o in outs[request.request_id] for t in o.token_ids]


# ---- API ------------------------------------------------------------------------------------------
def test_api_job_lifecycle(api, tokenizer):
    a, b = api.h["a"], api.h["b"]
    bad = "\n".join([json.dumps(r) for r in toy_records(2)] + ['{"prompt": "x"'])
    r = api.post("/v1/files", files={"file": ("bad.jsonl", bad.encode())}, data={"purpose": "tune"}, headers=a)
    assert r.status_code == 400 and "line 3" in r.json()["error"]["message"], r.text
    jsonl = "\n".join(json.dumps(r) for r in toy_records(8, answer=lambda i: " ok"))
    r = api.post("/v1/files", files={"file": ("train.jsonl", jsonl.encode())}, data={"purpose": "tune"}, headers=a)
    assert r.status_code == 200, r.text
    file = r.json()
    assert file["object"] == "file" and file["num_examples"] == 8 and file["id"].startswith("file-")
    assert api.get(f"/v1/files/{file['id']}", headers=b).status_code == 404

    r = api.post("/v1/tuning/jobs", headers=a, json={"name": "tuned", "training_data": [{"prompt": "x"}], "steps": 2})
    assert r.status_code == 400 and "training_data, line 1" in r.json()["error"]["message"]
    body = {"name": "tuned", "training_file": file["id"],
            "validation_data": [{"prompt": "Word: zebra\nLabel:", "completion": " ok"}],
            "num_virtual_tokens": 4, "init": "text", "init_text": "Answer ok", "steps": 4, "learning_rate": 0.3,
            "batch_size": 4, "seed": 3}
    r = api.post("/v1/tuning/jobs", headers=a, json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "tuning.job" and job["status"] in ("validating_files", "queued", "running") and job["model"] == "tiny-llama"
    assert api.get(f"/v1/tuning/jobs/{job['id']}", headers=b).status_code == 404
    done = wait_for_job(api, job["id"], a, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert done["step"] == 4 and [p["step"] for p in done["loss_curve"]] == [1, 2, 3, 4]
    assert done["metrics"]["eval_accuracy"] is not None and done["metrics"]["eval_loss"] > 0
    result = done["result_prompt"]
    assert result["name"] == "tuned" and done["fine_tuned_model"] == f"tuned@{result['version']}"
    listing = api.get("/v1/tuning/jobs", headers=a).json()
    assert [j["id"] for j in listing["data"]] == [job["id"]] and api.get("/v1/tuning/jobs", headers=b).json()["data"] == []

    # The prompt is in the store as a new version and servable at once, by name and pinned.
    info = api.get("/v1/prompts/tuned", headers=a).json()
    assert info["version"] == result["version"] and info["num_virtual_tokens"] == 4
    for model in ("tuned", done["fine_tuned_model"]):
        r = api.post("/v1/completions", headers=a, json={"model": model, "prompt": "Word: apple\nLabel:", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["virtual_tokens"] == 4
    assert api.post("/v1/completions", headers=b, json={"model": "tuned", "prompt": "x", "max_tokens": 1}).status_code == 404
    # Same data, same seed: a second job yields the same version (content-addressed), still "succeeded".
    again = wait_for_job(api, api.post("/v1/tuning/jobs", headers=a, json=body).json()["id"], a, ("succeeded", "failed"))
    assert again["result_prompt"]["version"] == result["version"]


def test_api_tuning_examples_fit_the_served_context_not_the_flag(tokenizer, tmp_path):
    """--max-model-len beyond the model's positions is capped for serving; tuning must size examples by
    the same cap (it used the uncapped flag, so examples the model cannot hold were trained on)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softserve.service.runtime import LoadedModel
    from softserve.app import create_app
    from softserve.config import Settings

    torch.manual_seed(0)
    short = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)).eval()
    short.requires_grad_(False)
    settings = Settings(store=str(tmp_path / "store"), max_model_len=2048)
    assert settings.max_model_len > 64
    with TestClient(create_app(settings, loaded=LoadedModel(short, tokenizer, "short"))) as client:
        record = {"prompt": "word " * 70 + "\nLabel:", "completion": " ok"}
        [example] = tokenize_examples(tokenizer, parse_records([record]))
        assert 64 - 4 < len(example.input_ids) < 2048 - 4
        served = client.post("/v1/completions", json={"model": "short", "prompt": record["prompt"], "max_tokens": 1})
        assert served.status_code == 400  # serving refuses it: the model has 64 positions
        body = {"name": "t", "training_data": [record], "num_virtual_tokens": 4, "init": "vocab", "steps": 1}
        r = client.post("/v1/tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        job = wait_for_job(client, r.json()["id"], {}, ("succeeded", "failed", "cancelled"))
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "invalid_training_data" and "the limit is 60" in job["error"]["message"]


def test_api_queue_and_cancel_while_serving(api):
    a = api.h["a"]
    body = {"name": "long", "training_data": toy_records(8), "init": "vocab", "steps": 100_000, "batch_size": 2}
    first = api.post("/v1/tuning/jobs", headers=a, json=body).json()
    second = api.post("/v1/tuning/jobs", headers=a, json={**body, "name": "next"}).json()
    running = wait_for_job(api, first["id"], a, ("running",), until=lambda job: job["step"] >= 1)
    # After a step the ETA is known: the remaining ~100k steps take well over a second.
    assert running["eta_seconds"] > 1 and running["estimated_finish"] > running["started_at"]
    queued = wait_for_job(api, second["id"], a, ("queued",))  # after validating_files
    assert queued["queue_position"] == 0
    # Serving continues while the job trains on the same model.
    r = api.post("/v1/completions", headers=a, json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    # ... and training goes on after it.
    served_at = api.get(f"/v1/tuning/jobs/{first['id']}", headers=a).json()["step"]
    wait_for_job(api, first["id"], a, ("running",), until=lambda job: job["step"] > served_at)
    r = api.post(f"/v1/tuning/jobs/{second['id']}/cancel", headers=a)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = api.post(f"/v1/tuning/jobs/{first['id']}/cancel", headers=a)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.json()
    assert api.get("/v1/prompts/long", headers=a).status_code == 404  # nothing stored for a cancelled job
    assert api.post(f"/v1/tuning/jobs/{first['id']}/cancel", headers=api.h["b"]).status_code == 404


def test_api_rejects_bad_requests(api):
    a = api.h["a"]
    cases = [
        ({"name": "x", "steps": 2}, "training_file"),
        ({"name": "x", "training_data": toy_records(2), "init": "text"}, "init_text"),
        ({"name": "x@abc", "training_data": toy_records(2)}, "versions are assigned"),
        ({"name": "x", "training_file": "file-nope"}, "not found"),
        ({"name": "x", "training_data": toy_records(2), "model": "other"}, "served model"),
        ({"name": "x", "training_data": toy_records(2), "num_virtual_tokens": 100_000}, "num_virtual_tokens"),
    ]
    for body, fragment in cases:
        r = api.post("/v1/tuning/jobs", headers=a, json=body)
        assert r.status_code in (400, 404), r.text
        assert fragment in r.json()["error"]["message"], r.text
    assert api.post("/v1/tuning/jobs", json={"name": "x", "training_data": toy_records(2)}).status_code == 401
    assert api.get("/v1/tuning/jobs/tunejob-nope", headers=a).status_code == 404


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_tune_writes_adapter_and_store_version(tokenizer, tmp_path, tmp_path_factory, capsys):
    from tests.support.live_server import tiny_model_dir
    from peft import PeftConfig

    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.store.types import ModelInfo
    from softserve.cli import main

    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in toy_records(6)))
    evals.write_text("".join(json.dumps(r) + "\n" for r in toy_records(2)))
    args = ["tune", "--data", str(train), "--eval", str(evals), "--name", "cli-tuned", "--model", str(model_dir),
            "--num-virtual-tokens", "3", "--init", "text", "--init-text", "Label it", "--steps", "2", "--batch-size", "2",
            "--out", str(tmp_path / "adapter"), "--store", str(tmp_path / "store"), "--log-every", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 1/2  loss" in out and "step 2/2  loss" in out and "eval_acc" in out and "ETA" in out
    summary = json.loads(out[out.index("{"):])
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).num_virtual_tokens == 3
    store = PromptStore(LocalBackend(tmp_path / "store"), ModelInfo("tiny", 64, 2, 4))
    assert store.resolve("default", "cli-tuned").version == summary["version"]

    train.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + "{oops\n")
    with pytest.raises(SystemExit, match="line 2: invalid JSON"):
        main(args)


# ---- real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_smollm_few_steps(smollm):
    model, tok = smollm
    before = param_digest(model)
    records = [{"prompt": f"Review: {t}\nSentiment:", "completion": c} for t, c in [
        ("I loved every minute of it.", " positive"), ("Terrible, a waste of money.", " negative"),
        ("Great service and tasty food.", " positive"), ("The screen broke after a day.", " negative")]]
    data = tokenize_examples(tok, parse_records(records))
    result = PromptTuner(model, tok, data, data, TuningConfig(num_virtual_tokens=4, init="text", init_text="Sentiment of the review",
                                                              steps=6, batch_size=4, learning_rate=0.03)).run()
    losses = [h.loss for h in result.history]
    assert losses[-1] < losses[0]
    assert param_digest(model) == before
