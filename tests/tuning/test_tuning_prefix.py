"""Prefix tuning (`method="prefix"`, PEFT PREFIX_TUNING), with and without PEFT's projection MLP, on the
tiny model in fp32: the loss curve equals PEFT's own training loop (same init, data order and recipe),
the saved files are PEFT's (keys, shapes, config) and load in `PeftModel.from_pretrained` with the
same greedy output as our serving engine and our eval decoder; jobs over the API are validated,
trained alone (never packed), served at once, and resume after a crash to the same result.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile

import pytest
import torch

from softserve.engine.request import Request, SamplingParams, SoftPrompt, SoftPromptRef
from softserve.tuning.export import adapter_files, model_info, save_adapter
from softserve.tuning.prefix import prefix_greedy_generate, prefix_shape
from softserve.tuning.trainer import PromptTuner, TuningConfig
from tests.support.engine_utils import make_engine
from tests.support.tuning import local_manager, toy_data, toy_records, wait_for_job

PROJECTION = [pytest.param(False, id="embedding"), pytest.param(True, id="projection")]


def _config(projection: bool, **kw) -> TuningConfig:
    base = dict(method="prefix", init="random", prefix_projection=projection,
                encoder_hidden_size=24 if projection else None, num_virtual_tokens=3, steps=5, batch_size=4,
                learning_rate=0.3, seed=3)
    return TuningConfig(**(base | kw))


def _peft_loop(tiny_model, tokenizer, data, cfg: TuningConfig, init: dict[str, torch.Tensor]):
    """PEFT's documented training loop (examples/causal_language_modeling): get_peft_model, loss from
    `peft_model(input_ids, attention_mask, labels)`, backward, clip, AdamW step, linear schedule. Our
    initial parameters are copied in by PEFT's names; batches in our trainer's seeded order."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    peft_model = get_peft_model(copy.deepcopy(tiny_model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size))
    encoder = peft_model.prompt_encoder["default"]
    assert {n: tuple(p.shape) for n, p in encoder.named_parameters()} == {n: tuple(t.shape) for n, t in init.items()}
    encoder.load_state_dict(init)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 0, cfg.steps)
    gen, order, losses = torch.Generator().manual_seed(cfg.seed), [], []
    for _ in range(cfg.steps):
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            batch.append(data[order.pop(0)])
        width = max(len(e.input_ids) for e in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731 (right padding, as ours)
        ids = torch.tensor(pad([e.input_ids for e in batch], tokenizer.pad_token_id))
        mask = torch.tensor(pad([[1] * len(e.input_ids) for e in batch], 0))
        labels = torch.tensor(pad([e.labels for e in batch], -100))
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return peft_model, losses


@pytest.mark.parametrize("projection", PROJECTION)
def test_prefix_loss_curve_equals_peft_and_files_round_trip(tiny_model, tokenizer, tmp_path, projection):
    from peft import PeftModel
    from safetensors.torch import load_file

    data = toy_data(tokenizer, 10, answer=lambda i: " ok")  # one answer: a few steps visibly learn it
    cfg = _config(projection)
    tuner = PromptTuner(tiny_model, tokenizer, data, None, cfg)
    init = {n: p.detach().clone() for n, p in tuner.params.items()}
    result = tuner.run()
    ours = [h.loss for h in result.history]
    peft_model, theirs = _peft_loop(tiny_model, tokenizer, data, cfg, init)
    assert ours[-1] < ours[0] - 0.1, ours  # it learns (else the comparison would be vacuous)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-5, rtol=1e-5)

    # The saved files are PEFT's: same keys, shapes and config (save_pretrained saves the projected KV).
    peft_model.save_pretrained(tmp_path / "peft")
    info = model_info(tiny_model, "tiny-llama")
    directory = save_adapter(adapter_files(result.embeddings, cfg, info), tmp_path / "ours")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(directory / "adapter_model.safetensors")
    assert list(ours_file) == list(theirs_file) == ["prompt_embeddings"]
    assert ours_file["prompt_embeddings"].shape == (3, prefix_shape(tiny_model).width) == (3, 128)
    torch.testing.assert_close(ours_file["prompt_embeddings"], theirs_file["prompt_embeddings"], atol=1e-4, rtol=1e-4)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((directory / "adapter_config.json").read_text())
    assert set(our_cfg) == set(peft_cfg) - {"peft_version"}
    differ = {k for k in our_cfg if our_cfg[k] != peft_cfg[k]}
    assert differ == {"base_model_name_or_path"}, differ  # PEFT wrote null: the tiny model has no name
    assert our_cfg["prefix_projection"] is projection and our_cfg["encoder_hidden_size"] == (24 if projection else 32)

    # PeftModel.from_pretrained on our files == our serving engine == our eval decoder, greedy.
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_model), directory).eval()
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, result.embeddings)
    engine = make_engine(tiny_model, tokenizer)
    soft = SoftPrompt(SoftPromptRef("pfx", "v1", f"sha-pfx-{projection}", 3), result.embeddings, kind="prefix_tuning")
    texts = ["Word: apple\nLabel:", "Word: zebra crossing at night\nLabel:"]
    requests = [Request(request_id=f"p{i}", prompt_ids=tokenizer(t).input_ids, soft_prompt=soft,
                        sampling=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
                for i, t in enumerate(texts)]
    outs = engine.generate_sync(requests)
    served = [[t for o in outs[r.request_id] for t in o.token_ids] for r in requests]
    for request, got in zip(requests, served):
        ids, expected = list(request.prompt_ids), []
        with torch.no_grad():
            for _ in range(5):
                logits = loaded(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
                expected.append(int(logits[0, -1].argmax()))
                ids.append(expected[-1])
        assert got == expected
    mine = prefix_greedy_generate(tiny_model, result.embeddings, [r.prompt_ids for r in requests], 5, set(),
                                  tokenizer.pad_token_id, prefix_shape(tiny_model))
    assert mine == served


def test_prefix_resume_state_carries_the_mlp_and_its_optimizer(tiny_model, tokenizer):
    """Stop after step 3 (mid-epoch), save through safetensors, resume: bit-identical to the uninterrupted
    run; without the MLP's AdamW moments it is not (the state really carries them)."""
    from softserve.store.backends import MemoryBackend
    from softserve.tuning.persist import JobStore

    data = toy_data(tokenizer, 10)
    cfg = _config(True, steps=6, micro_batch_size=2)
    full = PromptTuner(tiny_model, tokenizer, data, None, cfg).run()
    box: dict = {}

    def capture(info):
        if info.step == 3:
            box["state"] = box["tuner"].state()

    box["tuner"] = PromptTuner(tiny_model, tokenizer, data, None, cfg, on_progress=capture)
    box["tuner"].run()
    jobs = JobStore(MemoryBackend(), owner="t")
    tensors, meta = jobs.read_checkpoint(jobs.write_checkpoint("acme", "tunejob-x", 3, *box["state"]))
    assert {"param.embedding.weight", "param.transform.2.bias", "adam.transform.0.weight.exp_avg_sq"} <= set(tensors)
    assert meta["method"] == "prefix" and meta["prefix_projection"] is True
    resumed = PromptTuner(tiny_model, tokenizer, data, None, cfg)
    resumed.load_state(tensors, meta)
    out = resumed.run()
    assert [h.loss for h in out.history] == [h.loss for h in full.history[3:]]
    assert torch.equal(out.embeddings, full.embeddings)

    for key in [k for k in tensors if k.startswith("adam.transform.")]:
        del tensors[key]
    partial = PromptTuner(tiny_model, tokenizer, data, None, cfg)
    partial.load_state(tensors, meta)
    assert not torch.equal(partial.run().embeddings, full.embeddings)
    with pytest.raises(ValueError, match="method"):  # a prompt-tuning checkpoint never loads into a prefix job
        PromptTuner(tiny_model, tokenizer, data, None, _config(False, steps=6)).load_state(tensors, meta)


def _prefix_job(manager, steps: int) -> str:
    from softserve.tuning.job import new_job_id
    from softserve.tuning.records import new_record

    cfg = _config(True, steps=steps, micro_batch_size=2, learning_rate=0.05, seed=9, max_length=200)
    record = new_record(job_id=new_job_id(), tenant="acme", namespace="acme", name="pfx", model="tiny", config=cfg,
                        checkpoint_every=10, auto=[], num_examples={"train": 10, "validation": 0}, training_file=None,
                        validation_file=None, description=None, suffix=None, metadata=None)
    return manager.submit(record, {"train": "".join(json.dumps(r) + "\n" for r in toy_records(10))}).id


def _wait(manager, job_id, check, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = manager.get("acme", job_id)
        if check(rec):
            return rec
        time.sleep(0.01)
    raise AssertionError(f"timed out; status {rec['status']} step {rec['step']}")


def test_prefix_job_resumes_after_a_crash_to_the_same_adapter(tiny_model, tokenizer, tmp_path):
    """A server's manager stops mid-job (the job stays 'running' in the store, as after kill -9 once the
    lease is gone); a new manager on the same store resumes it from its last checkpoint and ends with the
    same PREFIX_TUNING adapter (projection on) and losses as an uninterrupted run. Packing is on
    (pack_jobs=2): prefix jobs train alone anyway."""
    steps = 80
    ref = local_manager(tiny_model, tokenizer, tmp_path / "ref", pack_jobs=2)
    try:
        reference = _wait(ref, _prefix_job(ref, steps), lambda r: r["status"] in ("succeeded", "failed"))
    finally:
        ref.close()
    assert reference["status"] == "succeeded", reference["error"]
    assert ref.pack is not None and ref.pack.batches == 0  # never packed

    first = local_manager(tiny_model, tokenizer, tmp_path / "store", pack_jobs=2)
    try:
        job_id = _prefix_job(first, steps)
        _wait(first, job_id, lambda r: len(r["checkpoints"]) >= 2)
    finally:
        first.close()
    stored = first.jobs.read("acme", job_id)
    assert stored["status"] == "running" and stored["checkpoints"][-1]["step"] < steps
    second = local_manager(tiny_model, tokenizer, tmp_path / "store", pack_jobs=2)
    try:
        done = _wait(second, job_id, lambda r: r["status"] in ("succeeded", "failed"))
        meta = second.store.resolve("acme", "pfx")
    finally:
        second.close()
    assert done["status"] == "succeeded", done["error"]
    assert done["runs"] == 2 and done["result"]["sha256"] == reference["result"]["sha256"]
    assert [p["loss"] for p in done["loss_curve"]] == [p["loss"] for p in reference["loss_curve"]]
    assert meta.peft_type == "PREFIX_TUNING" and meta.adapter_config["prefix_projection"] is True


def test_api_prefix_job_is_validated_trained_and_served(api, tiny_model, tokenizer, tmp_path):
    from peft import PeftModel

    a = api.h["a"]
    data = toy_records(8)
    bad = [
        ({"method": "lora"}, "method"),
        ({"method": "prefix", "init": "text", "init_text": "x"}, "random init"),
        ({"method": "prefix", "init": "vocab"}, "random init"),
        ({"prefix_projection": True}, "need method 'prefix'"),
        ({"encoder_hidden_size": 16}, "need method 'prefix'"),
        ({"method": "prefix", "encoder_hidden_size": 16}, "needs prefix_projection"),
        ({"method": "prefix", "prefix_projection": True, "encoder_hidden_size": 0}, "encoder_hidden_size"),
    ]
    for extra, fragment in bad:
        r = api.post("/v1/tuning/jobs", headers=a, json={"name": "p", "training_data": data, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert fragment in r.json()["error"]["message"], (extra, r.text)

    body = {"name": "pfx", "training_data": data, "method": "prefix", "prefix_projection": True,
            "encoder_hidden_size": 16, "num_virtual_tokens": 3, "steps": 3, "batch_size": 4, "learning_rate": 0.05}
    job = api.post("/v1/tuning/jobs", headers=a, json=body).json()
    done = wait_for_job(api, job["id"], a, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    hyper = done["hyperparameters"]
    assert (hyper["method"], hyper["prefix_projection"], hyper["encoder_hidden_size"], hyper["init"]) == \
        ("prefix", True, 16, "random")
    info = api.get("/v1/prompts/pfx", headers=a).json()
    assert info["kind"] == "prefix_tuning" and info["num_virtual_tokens"] == 3
    r = api.post("/v1/completions", headers=a, json={"model": "pfx", "prompt": "Word: apple\nLabel:", "max_tokens": 4,
                                                     "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["virtual_tokens"] == 3, r.text
    # The download is a PEFT adapter whose greedy output is what the server returned.
    z = zipfile.ZipFile(io.BytesIO(api.get("/v1/prompts/pfx/download", headers=a).content))
    z.extractall(tmp_path / "down")
    assert json.loads(z.read("adapter_config.json"))["prefix_projection"] is True
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path / "down").eval()
    ids, expected = tokenizer("Word: apple\nLabel:").input_ids, []
    with torch.no_grad():
        for _ in range(4):
            logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            expected.append(int(logits[0, -1].argmax()))
            ids.append(expected[-1])
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected)


def test_cli_tune_method_prefix_writes_a_peft_prefix_adapter(tokenizer, tmp_path, tmp_path_factory, capsys):
    from peft import PeftConfig

    from softserve.cli import main
    from tests.support.live_server import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in toy_records(6)))
    args = ["tune", "--data", str(train), "--name", "pfx", "--model", str(model_dir), "--method", "prefix",
            "--prefix-projection", "--encoder-hidden-size", "16", "--num-virtual-tokens", "3", "--steps", "2",
            "--batch-size", "2", "--out", str(tmp_path / "adapter")]
    assert main(args) == 0
    summary = json.loads((out := capsys.readouterr().out)[out.index("{"):])
    assert summary["method"] == "prefix"
    config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (config.peft_type, config.prefix_projection, config.encoder_hidden_size, config.num_virtual_tokens) == \
        ("PREFIX_TUNING", True, 16, 3)
    with pytest.raises(SystemExit, match="init-text"):
        main(args + ["--init-text", "Label it"])
    with pytest.raises(SystemExit, match="need method 'prefix'"):
        main([a for a in args if a not in ("--method", "prefix")])
