"""Incremental detokenization: never broken UTF-8, stop strings held back and cut."""

from __future__ import annotations

from softserve.engine.detokenizer import Detokenizer

TEXT = "Café 😀 — 中文字符 and emoji 🎉🎉 done."


def _feed(detok: Detokenizer, ids: list[int], stops=()):
    state = detok.new_state([1, 2, 3], tuple(stops), skip_special_tokens=True)
    deltas = []
    for i, token in enumerate(ids):
        text, hit = detok.step(state, token, is_last=i == len(ids) - 1)
        deltas.append(text)
        if hit:
            break
    deltas.append(detok.finish(state))
    return deltas


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "test text should contain a token that splits a character"
    deltas = _feed(Detokenizer(tokenizer), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_spanning_tokens_is_held_back_and_cut(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    deltas = _feed(Detokenizer(tokenizer), ids, stops=["and emo"])
    assert "".join(deltas) == TEXT[: TEXT.index("and emo")]
    assert all("and" not in d for d in deltas)


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    deltas = _feed(Detokenizer(tokenizer), ids, stops=["andX"])
    assert "".join(deltas) == tokenizer.decode(ids)


def test_backend_fast_path_emits_what_tokenizer_decode_emits(tokenizer):
    """The engine decodes through the `tokenizers` backend directly (cheaper per token); the deltas must be
    the ones transformers' `decode` gives, special tokens kept or skipped, multi-byte characters split."""
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    ids = ids[:5] + [tokenizer.eos_token_id] + ids[5:] + [tokenizer.eos_token_id]
    fast = Detokenizer(tokenizer)
    assert fast._fast_decode is not None, "the SmolLM2 tokenizer should take the backend path"
    slow = Detokenizer(tokenizer)
    slow._fast_decode = None  # transformers' decode, the reference
    for skip in (True, False):
        got, want = [], []
        for detok, out in ((fast, got), (slow, want)):
            state = detok.new_state([1, 2, 3], (), skip_special_tokens=skip)
            out.extend(detok.step(state, t, is_last=i == len(ids) - 1)[0] for i, t in enumerate(ids))
        assert got == want
        assert "".join(got) == tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
