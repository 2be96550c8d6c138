"""OpenAI request bodies -> the service's inputs: what the request asks for, checked at the edge.

Fields we do not implement are refused by name (never silently ignored); at most one structured-output
constraint may be set; the sampling template carries everything but the per-choice values.
"""

from __future__ import annotations

import json

from softserve.engine.request import GuidedSpec, SamplingParams
from softserve.service.errors import InvalidRequest

__all__ = ["num_prompts", "check_supported", "guided_spec", "sampling_template"]


def num_prompts(prompt) -> int:
    """How many prompts a `prompt` field holds, in O(1): the schema already made lists homogeneous."""
    if isinstance(prompt, str):
        return 1
    if not prompt or isinstance(prompt[0], int):
        return 1 if prompt else 0
    return len(prompt)


def check_supported(body) -> None:
    """InvalidRequest naming the first request field we do not implement."""
    found = body.unsupported_field()
    if found is not None:
        param, message = found
        raise InvalidRequest(message, param=param, code="unsupported_parameter")

def guided_spec(body) -> tuple[str, GuidedSpec] | None:
    """(param, constraint) from response_format / guided_* / structured_outputs; at most one may be set."""
    found: list[tuple[str, GuidedSpec]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", GuidedSpec("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidRequest("response_format.json_schema is required for type json_schema",
                           param="response_format.json_schema", code="invalid_parameter")
        found.append(("response_format.json_schema.schema", GuidedSpec("json_schema", json.dumps(fmt.json_schema.schema_))))
    so = body.structured_outputs
    candidates = [
        ("guided_json", "json_schema", body.guided_json),
        ("guided_regex", "regex", body.guided_regex),
        ("guided_choice", "choice", body.guided_choice),
        ("guided_grammar", "grammar", body.guided_grammar),
        ("structured_outputs.json", "json_schema", so.json_ if so else None),
        ("structured_outputs.regex", "regex", so.regex if so else None),
        ("structured_outputs.choice", "choice", so.choice if so else None),
        ("structured_outputs.grammar", "grammar", so.grammar if so else None),
    ]
    for param, kind, value in candidates:
        if value is not None:
            found.append((param, GuidedSpec(kind, value if isinstance(value, str) else json.dumps(value))))
    if so is not None and so.json_object:
        found.append(("structured_outputs.json_object", GuidedSpec("json_object")))
    if len(found) > 1:
        raise InvalidRequest(f"only one constraint may be set; got {found[0][0]} and {found[1][0]}",
                       param=found[1][0], code="invalid_parameter")
    if not found:
        return None
    param, spec = found[0]
    if body.ignore_eos or body.min_tokens:
        bad = "ignore_eos" if body.ignore_eos else "min_tokens"
        raise InvalidRequest(f"{bad} cannot be combined with {param}: the grammar decides where the answer ends",
                       param=bad, code="invalid_parameter")
    return param, spec


def sampling_template(body, *, logprobs: int | None, guided: GuidedSpec | None = None,
                      prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling params; max_tokens, seed and min_tokens are set per choice by the service."""
    return SamplingParams(
        max_tokens=0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        skip_special_tokens=body.skip_special_tokens,
        guided=guided,
        prompt_logprobs=prompt_logprobs,
    )
