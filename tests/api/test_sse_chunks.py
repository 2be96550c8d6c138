"""A stream's pre-encoded token chunks are byte for byte what encoding each whole chunk gives."""

from __future__ import annotations

import json

import pytest

from softserve.api import schemas as S
from softserve.api.openai_routes import _sse, _TemplateChunks

TEXTS = ["", "hello", ' "quoted" \\ back', "line\nbreak\ttab", "Café 😀 中文", "\u2028\x00\x1f", "}]}", "\ue000"]
MODELS = ["SmolLM2-135M-Instruct", 'odd "model"/name@v1+é']


def _completion(model: str):
    def encode(index: int, text: str) -> str:
        return _sse({"id": "cmpl-abc", "object": "text_completion", "created": 1_700_000_000, "model": model,
                     "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]})
    return encode


def _chat(model: str):
    def encode(index: int, text: str) -> str:
        chunk = S.ChatCompletionChunk(id="chatcmpl-abc", created=1_700_000_000, model=model,
                                      choices=[S.ChatStreamChoice(index=index, delta=S.ChatDelta(content=text))])
        return _sse(chunk.model_dump(exclude_none=True))
    return encode


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", [_completion, _chat])
def test_template_chunk_equals_the_whole_encoding(kind, model):
    encode = kind(model)
    chunks = _TemplateChunks(encode)
    for index in (0, 7, 123, 0):
        for text in TEXTS:
            got = chunks(index, text)
            assert got == encode(index, text)
            assert json.loads(got[len("data: "):])["choices"][0]["index"] == index


def test_an_encoding_that_does_not_write_the_text_as_json_is_refused():
    with pytest.raises(AssertionError):
        _TemplateChunks(lambda index, text: f"data: {index} {text.upper()}\n\n")(0, "x")
