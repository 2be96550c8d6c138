"""Smoke test of bench/: every script runs in --quick mode on a tiny model and prints its tables.

No timing assertions (the machine is shared); this only proves the scripts, their JSON and
run_all's report rendering work. Sizes are cut below --quick's to keep the whole test well under 60 s.
"""

from __future__ import annotations

import json

import pytest

QUICK = ["--quick", "--model", "tiny", "--threads", "1"]
CASES = {
    "roofline": (["--batch", "1,2", "--steps", "2", "--matmul-n", "256"], ["### Roofline", "| batch | seq | engine ms/step"]),
    "baselines": (["--batch", "2", "--max-tokens", "4", "--seq-requests", "1"],
                  ["### Baselines", "| configuration | output tok/s", "(i) PEFT sequential"]),
    "load": (["--concurrency", "2", "--warmup", "0.3", "--window", "1", "--num-prompts", "4"],
             ["### Heterogeneity tax", "| C | (a) one prompt | (b) C distinct prompts", "| C | config | TTFT p50 ms"]),
    "prefix_cache": (["--k", "8", "--batch", "1", "--repeats", "1"], ["### Prompt KV prefix cache", "| k | rows | cache on ms"]),
    "prompt_scale": (["--num-prompts", "20", "--cold-requests", "2", "--warmup", "0.3", "--window", "1"],
                     ["### Prompt scale", "`GET /v1/prompts`", "| working set | output tok/s"]),
    "dtype": (["--num-prompts", "2", "--max-tokens", "4", "--batch", "1,2"], ["### dtype", "| batch | fp32 tok/s | bf16 tok/s"]),
    "engine_step": (["--batch", "1,2", "--steps", "2", "--context", "8"], ["### Engine decode step vs bare HF forward", "| batch | engine ms/step"]),
    "guided_cost": (["--concurrency", "2", "--steps", "2"], ["### Guided decoding cost", "| rows constrained | output tok/s"]),
}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("name", list(CASES))
def test_script_quick(name, out_dir, capsys):
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    extra, headers = CASES[name]
    result = mod.main([*QUICK, *extra, "--json", str(out_dir / f"{name}.json")])
    printed = capsys.readouterr().out
    for header in headers:
        assert header in printed, f"{name}: {header!r} missing from\n{printed}"
    assert json.loads((out_dir / f"{name}.json").read_text())["name"] == name
    assert result["name"] == name


def test_run_all_renders(out_dir):
    from bench import run_all

    missing = [n for n in CASES if not (out_dir / f"{n}.json").exists()]
    if missing:
        pytest.skip(f"scripts did not produce JSON: {missing}")
    rc = run_all.main(["--render-only", "--quick", "--out", str(out_dir), "--results", str(out_dir / "RESULTS.md"),
                       "--png", str(out_dir / "throughput.png")])
    assert rc == 0
    text = (out_dir / "RESULTS.md").read_text()
    for header in ("## Goals", "## Machine", "### Heterogeneity tax", "### Baselines", "### Roofline", "### dtype"):
        assert header in text
