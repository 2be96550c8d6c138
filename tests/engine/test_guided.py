"""Guided decoding in the engine: per-row constraints in one batch, on the tiny random model.

The tiny model is random, so without the mask it would never emit JSON or one of the choices: every
valid answer below is the constraint's doing.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tests.support.engine_utils import make_engine, make_prompt, make_request
from softserve.engine.guided import GuidedSpecError, advance_guided, attach_guided_state, grammar_for
from softserve.engine.request import GuidedSpec
from softserve.engine.sampler import apply_guided_masks

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["label", "score", "ok", "name"],
    "additionalProperties": False,
}
OTHER_SCHEMA = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer", "maximum": 9},
                                                       "maxItems": 3}}, "required": ["n"], "additionalProperties": False}
CHOICES = ["yes", "no", "maybe not"]
PROMPTS = ["Review: great film", "Is the sky green?", "1, 2, 3", "Write a poem about the sea", "Hello"]


def _text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def _spec(kind, value) -> GuidedSpec:
    return GuidedSpec(kind=kind, value=value if isinstance(value, str) else json.dumps(value))


def test_mixed_batch_constrained_rows_valid_unconstrained_rows_unchanged(tiny_model, tokenizer):
    hidden = tiny_model.config.hidden_size
    soft = make_prompt("p", 4, hidden, seed=1)
    engine = make_engine(tiny_model, tokenizer, max_batch_size=16)
    cases = []  # (request, kind)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt).input_ids
        sp = soft if i % 2 else None
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=12), None))
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=12, temperature=1.0, seed=i), None))
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=80, guided=_spec("json_schema", SCHEMA)), SCHEMA))
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=80, temperature=1.0, seed=100 + i,
                                   guided=_spec("json_schema", SCHEMA)), SCHEMA))
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=40, temperature=0.8, seed=200 + i,
                                   guided=_spec("json_schema", OTHER_SCHEMA)), OTHER_SCHEMA))
        cases.append((make_request(ids, soft_prompt=sp, max_tokens=10, temperature=1.0, seed=300 + i,
                                   guided=_spec("choice", CHOICES)), "choice"))
    outputs = engine.generate_sync([r for r, _ in cases])
    tokens = {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}
    finish = {rid: outs[-1].finish_reason.value for rid, outs in outputs.items()}

    for request, kind in cases:
        got = tokens[request.request_id]
        if kind is None:
            continue
        assert finish[request.request_id] == "stop", (kind, _text(tokenizer, got))
        text = _text(tokenizer, got)
        if kind == "choice":
            assert text in CHOICES
        else:
            jsonschema.validate(json.loads(text), kind)

    # Unconstrained rows: exactly the tokens they get alone (greedy and seeded sampling).
    for request, kind in cases:
        if kind is not None:
            continue
        solo = make_request(request.prompt_ids, soft_prompt=request.soft_prompt, max_tokens=12,
                            temperature=request.sampling.temperature, seed=request.sampling.seed)
        alone = make_engine(tiny_model, tokenizer).generate_sync([solo])
        assert [t for o in alone[solo.request_id] for t in o.token_ids] == tokens[request.request_id]


def test_without_the_constraint_the_tiny_model_does_not_write_json(tiny_model, tokenizer):
    """Not vacuous: the unconstrained random model's answer is not valid JSON."""
    engine = make_engine(tiny_model, tokenizer)
    request = make_request(tokenizer(PROMPTS[0]).input_ids, max_tokens=30)
    text = _text(tokenizer, [t for o in engine.generate_sync([request])[request.request_id] for t in o.token_ids])
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("seed", range(6))
def test_guided_choice_is_always_one_of_the_choices(tiny_model, tokenizer, seed):
    engine = make_engine(tiny_model, tokenizer)
    requests = [make_request(tokenizer(p).input_ids, max_tokens=8, temperature=1.5, seed=seed * 10 + i,
                             guided=_spec("choice", CHOICES)) for i, p in enumerate(PROMPTS)]
    outs = engine.generate_sync(requests)
    for r in requests:
        assert _text(tokenizer, [t for o in outs[r.request_id] for t in o.token_ids]) in CHOICES


def test_regex_and_json_object(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    regex = make_request(tokenizer("Phone:").input_ids, max_tokens=20, temperature=1.0, seed=3,
                         guided=_spec("regex", r"\d{3}-\d{4}"))
    obj = make_request(tokenizer("JSON:").input_ids, max_tokens=200, temperature=0.0,
                       guided=GuidedSpec(kind="json_object"))
    outs = engine.generate_sync([regex, obj])
    import re

    assert re.fullmatch(r"\d{3}-\d{4}", _text(tokenizer, [t for o in outs[regex.request_id] for t in o.token_ids]))
    text = _text(tokenizer, [t for o in outs[obj.request_id] for t in o.token_ids])
    if outs[obj.request_id][-1].finish_reason.value == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a valid prefix of an object
        assert text.startswith("{")


def test_mask_touches_only_constrained_rows(tokenizer):
    """The batched mask leaves other rows' logits bit-identical and forbids all but the grammar's tokens."""
    eos = {tokenizer.eos_token_id}
    free = make_request([1, 2, 3])
    choice = make_request([1, 2, 3], guided=_spec("choice", ["yes"]))
    attach_guided_state(choice, tokenizer, eos)
    logits = torch.randn(2, len(tokenizer) + 7)  # a model may have padding columns past the tokenizer
    before = logits.clone()
    apply_guided_masks(logits, [free, choice])
    assert torch.equal(logits[0], before[0])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]) and "yes".startswith(tokenizer.decode([t])) for t in allowed)
    # Once the grammar is complete, only the engine's stop token may follow.
    advance_guided([choice], [tokenizer("yes", add_special_tokens=False).input_ids[0]])
    logits = torch.randn(1, len(tokenizer))
    apply_guided_masks(logits, [choice])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted(eos)


@pytest.mark.parametrize("spec", [
    GuidedSpec("json_schema", '{"type": "objectx"}'),
    GuidedSpec("json_schema", "{not json"),
    GuidedSpec("regex", "[a-z"),
    GuidedSpec("choice", "[]"),
    GuidedSpec("grammar", "start: ???"),
])
def test_invalid_constraints_raise(spec):
    with pytest.raises(GuidedSpecError):
        grammar_for(spec)


def test_engine_rejects_a_bad_grammar_at_add(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    with pytest.raises(ValueError):
        engine.add_request(make_request([1, 2], guided=GuidedSpec("regex", "(")))
