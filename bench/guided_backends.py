"""Which grammar library for guided decoding: mask time per token and set-up time, on SmolLM2's vocabulary.

Not part of run_all.py (it needs outlines-core, which Softserve does not depend on):

    .venv/bin/pip install outlines-core llguidance
    nice -n 15 .venv/bin/python bench/guided_backends.py

Both libraries walk the same token sequence (a valid JSON document for the schema below, tokenized
with the model's tokenizer) and compute the full-vocabulary mask before every token, as the engine
does at each decode step. xgrammar is not measured: on Linux x86_64 it requires `triton` (a 286 MB
wheel) and `apache-tvm-ffi`, too heavy for a CPU server.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
    },
    "required": ["name", "age", "tags", "sentiment"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], "sentiment": "positive"},
                      separators=(",", ":"))


def _tokenizer():
    from transformers import AutoTokenizer

    from softserve.model_loader import embedded_model_source

    source = embedded_model_source()
    return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


def bench_llguidance(tok, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import torch

    t0 = time.perf_counter()
    info = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(info, grammar)
    t2 = time.perf_counter()
    mask = torch.full((1, (len(tok) + 31) // 32), -1, dtype=torch.int32)
    times = []
    for token in ids:
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        times.append(time.perf_counter() - start)
        assert matcher.consume_token(token), matcher.get_error()
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_us": _stats(times)}


def bench_outlines_core(tok, ids: list[int]) -> dict:
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    # Byte-level BPE: map every token back to its raw bytes (outlines-core keys the vocabulary by them).
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    vocab: dict[bytes, list[int]] = {}
    eos = tok.eos_token_id
    for token, token_id in tok.get_vocab().items():
        if token_id == eos:
            continue
        if all(ch in byte_decoder for ch in token):
            raw = bytes(byte_decoder[ch] for ch in token)
        else:
            raw = token.encode()
        vocab.setdefault(raw, []).append(token_id)
    vocabulary = outlines_core.Vocabulary(eos, vocab)
    t1 = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = outlines_core.Guide(index)
    t2 = time.perf_counter()
    mask = torch.zeros((1, (len(tok) + 31) // 32), dtype=torch.int32)
    times = []
    for token in ids:
        start = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - start)
        if token != eos:
            guide.advance(token)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_us": _stats(times)}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _stats(seconds: list[float]) -> dict:
    us = sorted(s * 1e6 for s in seconds)
    return {"mean": round(sum(us) / len(us), 1), "p50": round(us[len(us) // 2], 1), "max": round(us[-1], 1), "n": len(us)}


def _size_mb(module_name: str) -> float:
    module = __import__(module_name)
    root = Path(module.__file__).parent
    return round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> None:
    tok = _tokenizer()
    ids = tok(DOCUMENT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    results = {"document_tokens": len(ids), "vocab": len(tok)}
    for name, fn, module in (("llguidance", bench_llguidance, "llguidance"),
                             ("outlines-core", bench_outlines_core, "outlines_core")):
        try:
            results[name] = {**fn(tok, ids), "installed_mb": _size_mb(module)}
        except Exception as exc:  # report and go on: the point is the side-by-side table
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
